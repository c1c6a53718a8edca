"""The `keras-lstm` command."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _demo(args) -> int:
    from keras_lstm import demo

    demo.run(out=args.out, epochs=args.epochs, units=args.units)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-lstm", description="An LSTM for Keras 3 whose gates are code you can read."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a next-hour temperature forecaster on Seattle 2010 and compare it",
        description="Train GatedLSTM and keras.layers.LSTM on the hourly Seattle temperatures "
        "shipped by vega_datasets, print test MAE against persistence, save the model.",
    )
    demo.add_argument("--out", default="keras-lstm-demo", help="folder for model.keras")
    demo.add_argument("--epochs", type=_positive_int, default=8)
    demo.add_argument("--units", type=_positive_int, default=32)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

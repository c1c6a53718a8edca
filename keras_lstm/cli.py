"""The `keras-lstm` command."""

from __future__ import annotations

import argparse
import os
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


def _export(args) -> int:
    import keras

    from keras_lstm.serving import export_for_serving

    try:
        model = keras.saving.load_model(args.model, compile=False)
        path = export_for_serving(
            model,
            args.base_dir,
            args.version,
            jit_compile=not args.no_jit,
            streaming=False if args.no_streaming else "auto",
            warmup=not args.no_warmup,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"keras-lstm export: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _serve_check(args) -> int:
    from keras_lstm import _serve_check

    try:
        return _serve_check.launch(args.base_dir)
    except ValueError as error:
        print(f"keras-lstm serve-check: {error}", file=sys.stderr)
        return 1


def _quiet_tensorflow() -> None:
    # TensorFlow's start-up lines would drown a report of a dozen lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _doctor(args) -> int:
    _quiet_tensorflow()
    from keras_lstm import _doctor

    return _doctor.doctor()


def _build(args) -> int:
    _quiet_tensorflow()
    from keras_lstm import _doctor

    return _doctor.build(force=args.force, jit_compile=not args.no_xla, prune=args.prune)


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

    export = commands.add_parser(
        "export",
        help="export a saved .keras model as a new TensorFlow Serving version",
        description="Write BASE_DIR/<version>/ (SavedModel with serving_default, and step and "
        "initial_state where the model can stream, plus warmup requests), atomically.",
    )
    export.add_argument("model", help="a model saved with model.save('....keras')")
    export.add_argument("base_dir", help="the folder TensorFlow Serving watches")
    export.add_argument(
        "--version", type=_positive_int, default=None, help="default: the next free number"
    )
    export.add_argument("--no-jit", action="store_true", help="do not compile with XLA")
    export.add_argument("--no-streaming", action="store_true", help="write serving_default only")
    export.add_argument(
        "--no-warmup", action="store_true", help="write no warmup requests (assets.extra/)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")
    export.set_defaults(run=_export)

    serve_check = commands.add_parser(
        "serve-check",
        help="load the newest version without Keras, as a server would, and run each signature",
        description="In a fresh Python process where Keras cannot be imported, load the newest "
        "version in BASE_DIR with tf.saved_model.load, print each signature's inputs and "
        "outputs, run it on a random batch and replay the warmup requests.",
    )
    serve_check.add_argument("base_dir", help="the folder holding numbered versions")
    serve_check.set_defaults(run=_serve_check)

    doctor = commands.add_parser(
        "doctor",
        help="say which path GatedLSTM runs here (native, under XLA, TensorFlow ops) and why",
        description="Print the Python, Keras and TensorFlow versions, the CPU and its vector "
        "extensions, the compiler, the kernel cache and its libraries, and which path GatedLSTM "
        "runs. Builds nothing. Exits 1 where the native kernel should run but cannot.",
    )
    doctor.set_defaults(run=_doctor)

    build = commands.add_parser(
        "build",
        help="build the native kernel now (for an image or a cluster node), exit 1 if it cannot",
        description="Build the native LSTM kernel and its XLA library into the cache "
        "(KERAS_LSTM_CACHE_DIR, else ~/.cache/keras_lstm), both at once, and load them. A "
        "library already built and intact is kept; a failed one is tried again.",
    )
    build.add_argument("--force", action="store_true", help="rebuild libraries already built")
    build.add_argument("--no-xla", action="store_true", help="skip the XLA (jit_compile) library")
    build.add_argument(
        "--prune", action="store_true", help="remove the cache's libraries of other keys"
    )
    build.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

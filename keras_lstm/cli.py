"""The `keras-lstm` command."""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
import zlib


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _version_number(text: str) -> int:
    """A model version: a positive integer that TensorFlow Serving can read (int64)."""
    value = _positive_int(text)
    if value > 2**63 - 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer up to {2**63 - 1} (servers read versions as int64), "
            f"got {text}"
        )
    return value


def _demo(args) -> int:
    from keras_lstm import demo

    try:
        demo.check_out(args.out, name="--out")  # before a minute of training, not after
    except ValueError as error:
        print(f"keras-lstm demo: {error}", file=sys.stderr)
        return 1
    demo.run(out=args.out, epochs=args.epochs, units=args.units)
    return 0


def load_model(path: str | os.PathLike):
    """`keras.saving.load_model(path, compile=False)`, saying plainly what is wrong.

    Keras answers "File not found" for a `.keras` file that exists but is
    not a zip file, or is cut short; this raises a `ValueError` that says
    which it is (missing, a folder, empty, not a zip file, truncated or
    damaged, a zip file without a model), in one line.
    """
    import keras

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`{path}` does not exist.")
    if os.path.isdir(path):
        raise ValueError(
            f"`{path}` is a folder; expected a model file saved with model.save('name.keras')."
        )
    if path.endswith(".keras"):
        problem = _keras_archive_problem(path)
        if problem:
            raise ValueError(problem)
    try:
        return keras.saving.load_model(path, compile=False)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"`{path}` is truncated or damaged ({error}).") from error


def _keras_archive_problem(path: str) -> str | None:
    """What keeps `path` from being a readable `.keras` archive, or None."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"`{path}` is empty; expected a Keras archive saved with model.save()."
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":  # a zip file's start without its end
            return f"`{path}` is truncated or damaged: a zip file cut short."
        return f"`{path}` is not a Keras archive (not a zip file)."
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        return f"`{path}` is truncated or damaged ({error})."
    if damaged is not None:
        return f"`{path}` is damaged: `{damaged}` inside it fails its checksum."
    if "config.json" not in names:
        return f"`{path}` is a zip file but not a Keras archive (no config.json inside)."
    return None


def _export(args) -> int:
    from keras_lstm.serving import export_for_serving

    try:
        model = load_model(args.model)
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
    except (ValueError, OSError) as error:
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
        "--version", type=_version_number, default=None, help="default: the next free number"
    )
    export.add_argument("--no-jit", action="store_true", help="do not compile with XLA")
    export.add_argument("--no-streaming", action="store_true", help="write serving_default only")
    export.add_argument(
        "--no-warmup", action="store_true", help="write no warmup requests (assets.extra/)"
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing version (unsafe while a server serves or loads it: export a "
        "new version instead)",
    )
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

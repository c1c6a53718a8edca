"""`export_for_serving`: a SavedModel version for TensorFlow Serving.

Writes `base_dir/<version>/` atomically with the `serving_default`, `step`
and `initial_state` signatures (`_streaming` plans the last two) and warmup
requests (`_warmup`).
"""

from __future__ import annotations

import os
import shutil

import keras

from keras_lstm import _checks
from keras_lstm._atomic import atomic_directory, remove_stale_temporaries
from keras_lstm._serve_check import versions
from keras_lstm.serving import _graph, _streaming, _warmup


def export_for_serving(
    model: keras.Model,
    base_dir: str | os.PathLike,
    version: int | None = None,
    *,
    jit_compile: bool = True,
    streaming: bool | str = "auto",
    warmup: bool = True,
    overwrite: bool = False,
) -> str:
    """Write `model` as version `version` of a TensorFlow Serving model.

    The result is `base_dir/<version>/` holding `saved_model.pb`,
    `variables/` and (with `warmup=True`)
    `assets.extra/tf_serving_warmup_requests`. It is written to a hidden
    sibling folder first and renamed into place once complete, so a server
    watching `base_dir` never sees half a version, and a failure leaves
    `base_dir` as it was. Hidden folders that earlier exports left behind
    when they were killed are removed (only those whose writing process is
    gone: see docs/serving.md, "Leftovers of interrupted exports").

    Signatures (docs/serving.md, "Signatures"; inputs and outputs are named
    after the model's, and `<layer>_h` / `<layer>_c` for each recurrent
    layer's states): `serving_default`, whole sequences of any batch and
    length in, the model's outputs out; with streaming, `step`, one step and
    the states in, that step's outputs and the new states out (step by step
    from zero states it reproduces `serving_default`), and `initial_state`,
    a scalar int32 `batch_size` in, zero states out.

    Streaming needs recurrent layers that read forwards and, between them
    and the input, layers that work on each step alone (docs/serving.md,
    "Which models stream"). Stateful layers are served stateless, rebuilt
    with the same weights (docs/serving.md, "Stateful models").

    Args:
        model: A built functional or Sequential `keras.Model` (a subclassed
            model can be wrapped: `keras.Model(inp, model(inp))`).
        base_dir: The model's folder, the one a server's `--model_base_path`
            points at. Created if missing; must not be a file.
        version: Positive integer version. Default: `None`, one more than the
            largest version in `base_dir` (1 if none; only folders named by
            digits alone count, as for TensorFlow Serving). If another
            export takes that number while this one is written, this one
            takes the next free number: the default never replaces a
            version.
        jit_compile: Compile the signatures with XLA (`tf.function(
            jit_compile=True)`). The server must run XLA: start
            `tensorflow_model_server` with `--xla_cpu_compilation_enabled=true`,
            or export with `False` (see docs/serving.md). Default: `True`.
        streaming: `"auto"` adds `step` and `initial_state` when the model
            allows it and skips them silently otherwise; `True` requires them
            and raises a `ValueError` saying why when the model does not
            allow it; `False` writes `serving_default` only. Default:
            `"auto"`.
        warmup: Write warmup requests, replayed by TensorFlow Serving at
            load time so the first real request does not pay for tracing
            and XLA compilation. Default: `True`.
        overwrite: Replace an existing `base_dir/<version>` (once the new
            one is complete); unsafe while a server serves or loads it
            (docs/serving.md, "Rolling out a new version"). Default: `False`
            (an existing version raises `FileExistsError`).

    Returns:
        The path of the version folder, `base_dir/<version>`.

    Example:

    >>> import tempfile, keras, tensorflow as tf
    >>> from keras_lstm import GatedLSTM, export_for_serving
    >>> model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4), keras.layers.Dense(1)])
    >>> path = export_for_serving(model, tempfile.mkdtemp())
    >>> sorted(tf.saved_model.load(path).signatures)
    ['initial_state', 'serving_default', 'step']
    """
    _graph.require_tensorflow_backend("export_for_serving")
    _check_streaming(streaming)
    model = _graph.servable_model(model)
    base_dir = _checked_base_dir(base_dir)
    if warmup:
        _warmup.serving_protos()  # say what is missing before any tracing
    version, version_dir = _checked_version_dir(base_dir, version, overwrite)
    plan = _stream_plan(model, streaming)
    archive = _tensorflow_only_archive(model, plan, jit_compile)
    writer = _version_writer(base_dir, version_dir, version, overwrite)
    _write_version(writer, archive, model, plan, base_dir, warmup)
    return writer.path


def _check_streaming(streaming):
    """Refuse a `streaming` that is not True, False or "auto"."""
    if streaming not in (True, False, "auto"):
        raise ValueError(f"`streaming` must be True, False or 'auto', got {streaming!r}.")


def _checked_base_dir(base_dir):
    """`base_dir` as an absolute path, refused if it names a file."""
    base_dir = os.path.abspath(os.fspath(base_dir))
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ValueError(f"`base_dir` must be a folder, but `{base_dir}` is a file.")
    return base_dir


def _checked_version_dir(base_dir, version, overwrite):
    """`(version, version_dir)`: the checked version (or `None`) and the folder to write."""
    version = None if version is None else _version(version)
    number = _next_version(base_dir) if version is None else version
    version_dir = os.path.join(base_dir, str(number))
    if version is not None and os.path.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"Version {number} already exists at `{version_dir}`; pass a new `version`, "
            "leave it None for the next free one, or pass overwrite=True to replace it."
        )
    return version, version_dir


def _stream_plan(model, streaming):
    """The plan of the `step` and `initial_state` signatures, or `None` for none."""
    if not streaming:
        return None
    plan, reason = _streaming.stream_plan(model)
    if plan is None and streaming is True:
        raise ValueError(
            f"This model cannot be exported with a streaming `step` signature: {reason} "
            "Pass streaming=False (or 'auto') to export serving_default only."
        )
    return plan


def _tensorflow_only_archive(model, plan, jit_compile):
    """`_archive`, traced so that the export does not need our native kernel's library."""
    from keras_lstm import _routes

    with _routes.exporting("saved_model"):
        return _archive(model, plan, jit_compile)


def _version_writer(base_dir, version_dir, version, overwrite):
    """The `atomic_directory` that writes `version_dir` (a free number if `version` is None)."""

    def next_free_version():
        return os.path.join(base_dir, str(_next_version(base_dir)))

    # With no `version` given, a number that another export takes while this
    # one is written is skipped, never replaced.
    return atomic_directory(
        version_dir,
        overwrite=overwrite and version is not None,
        next_path=next_free_version if version is None else None,
    )


def _write_version(writer, archive, model, plan, base_dir, warmup):
    """Write the archive (and warmup requests) through `writer`, leaving no new empty `base_dir`."""
    from keras_lstm import _routes

    created_base = not os.path.exists(base_dir)
    remove_stale_temporaries(base_dir, targets=r"[0-9]+")
    try:
        with _routes.exporting("saved_model"), writer as tmp:
            with _graph.quiet_tensorflow_logger():
                archive.write_out(tmp, verbose=False)
            if warmup:
                _warmup.write_warmup(tmp, model, plan, model_name=os.path.basename(base_dir))
    except BaseException:
        if created_base and os.path.isdir(base_dir) and not os.listdir(base_dir):
            shutil.rmtree(base_dir, ignore_errors=True)
        raise


def _version(version):
    return _checks.positive_int64("version", version)


def _next_version(base_dir):
    """One more than the largest version in `base_dir`, 1 if none.

    Entries whose names are not base-10 numbers (`tmp`, `.ipynb_checkpoints`,
    `²`) are not versions, as for TensorFlow Serving.
    """
    if not os.path.isdir(base_dir):
        return 1
    return max(versions(base_dir), default=0) + 1


def _archive(model, plan, jit_compile):
    """An `ExportArchive` holding the model's variables and traced signatures."""
    import tensorflow as tf

    specs = _graph.input_specs(model)
    output_names = _graph.output_names(model)
    serve = _graph.serve_function(model, output_names)

    archive = keras.export.ExportArchive()
    archive.track(model)
    functions = {"serving_default": _traced(serve, specs, jit_compile)}
    if plan is not None:
        functions["step"] = _traced(
            plan.step_function(output_names), plan.step_specs(), jit_compile
        )
        functions["initial_state"] = _traced(
            plan.initial_state, [tf.TensorSpec([], tf.int32, name="batch_size")], jit_compile
        )
    for name, function in functions.items():
        archive.add_endpoint(name, function)
    return archive


def _traced(python_function, specs, jit_compile):
    """A `tf.function` of `python_function` over `specs`, traced now.

    Each argument first goes through `tf.ensure_shape` against its spec.
    The signatures of a loaded SavedModel do not check the shapes they are
    fed, so without it an input of the wrong feature size (two inputs
    swapped by name, say) could run and answer wrongly; with it such a call
    fails with an `InvalidArgumentError` naming the input and the shape
    expected.
    """
    import tensorflow as tf

    def checked(*args):
        args = [tf.ensure_shape(a, s.shape) for a, s in zip(args, specs, strict=True)]
        return python_function(*args)

    checked.__name__ = python_function.__name__  # names the traced functions
    function = tf.function(
        checked, input_signature=specs, jit_compile=bool(jit_compile), autograph=False
    )
    function.get_concrete_function()  # trace now: errors surface before anything is written
    return function

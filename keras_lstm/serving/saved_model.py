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

    To roll out a new model, export it as a new version (the default) and
    let the server switch to it; do not replace a version a server is
    serving or loading.

    Signatures (the names of inputs and outputs are those of the model's
    input and output layers, and `<layer>_h` / `<layer>_c` for the states of
    each recurrent layer):

    - `serving_default`: each input with its batch and time axes `None`
      and its feature size fixed; returns the model's outputs. A request
      whose feature size differs is refused (`InvalidArgumentError` naming
      the input), as is one that swaps two inputs of different sizes.
    - `step` (streaming): each input without its time axis, plus every
      recurrent layer's states; returns the outputs for that step (what the
      model would return for the sequence so far) and the new states.
      Feeding a sequence one step at a time, starting from zero states,
      reproduces `serving_default` on the whole sequence.
    - `initial_state` (streaming): a scalar int32 `batch_size`; returns zero
      states of the right shapes.

    Streaming needs a functional or Sequential model with one sequence input
    whose recurrent layers are `GatedLSTM`, `keras.layers.RNN` of a
    `GatedLSTMCell` (or a Keras LSTM, GRU or SimpleRNN), reading forwards, and
    whose other layers between input and recurrent layers work on each step
    alone (Dense, Masking, Dropout, normalisation over features, merges, ...).
    Layers that mix time steps (Bidirectional, Conv1D, attention, Flatten on
    a sequence) rule it out.

    A model with `stateful=True` recurrent layers is served stateless: it is
    rebuilt from its config with `stateful=False` and the same weights (the
    state a stateful layer would carry belongs to the client of `step`).

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
            one is complete). Unsafe while a server serves or loads that
            version: a load in progress fails, and a server that has loaded
            the version keeps serving its old copy, since it tells versions
            apart by number. Roll out a new version number instead.
            Default: `False` (an existing version raises `FileExistsError`).

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
    if streaming not in (True, False, "auto"):
        raise ValueError(f"`streaming` must be True, False or 'auto', got {streaming!r}.")
    model = _graph.servable_model(model)
    base_dir = os.path.abspath(os.fspath(base_dir))
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ValueError(f"`base_dir` must be a folder, but `{base_dir}` is a file.")
    if warmup:
        _warmup.serving_protos()  # say what is missing before any tracing
    version = None if version is None else _version(version)
    number = _next_version(base_dir) if version is None else version
    version_dir = os.path.join(base_dir, str(number))
    if version is not None and os.path.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"Version {number} already exists at `{version_dir}`; pass a new `version`, "
            "leave it None for the next free one, or pass overwrite=True to replace it."
        )

    plan = None
    if streaming:
        plan, reason = _streaming.stream_plan(model)
        if plan is None and streaming is True:
            raise ValueError(
                f"This model cannot be exported with a streaming `step` signature: {reason} "
                "Pass streaming=False (or 'auto') to export serving_default only."
            )

    from keras_lstm import _routes

    # TensorFlow ops only: the export must not need our native kernel's library.
    with _routes.exporting("saved_model"):
        archive = _archive(model, plan, jit_compile)
    created_base = not os.path.exists(base_dir)
    remove_stale_temporaries(base_dir, targets=r"[0-9]+")

    def next_free_version():
        return os.path.join(base_dir, str(_next_version(base_dir)))

    # With no `version` given, a number that another export takes while this
    # one is written is skipped, never replaced.
    writer = atomic_directory(
        version_dir,
        overwrite=overwrite and version is not None,
        next_path=next_free_version if version is None else None,
    )
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
    return writer.path


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

"""Export a Keras model for TensorFlow Serving (SavedModel) and for TFLite.

`export_for_serving` writes the layout TensorFlow Serving watches,
`base_dir/<version>/`, with three signatures:

- `serving_default`: whole sequences in, the model's outputs out.
- `step`: one time step and every recurrent layer's states in, the outputs
  and the new states out, so a server can run an endless stream while the
  client holds the state between requests.
- `initial_state`: the zero states for a batch size, to start a stream.

`export_tflite` writes a fixed-length, unrolled copy of the model as a
`.tflite` flat buffer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_lstm import _checks, _internals
from keras_lstm._atomic import atomic_directory, atomic_file, remove_stale_temporaries
from keras_lstm._serve_check import versions

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
_WARMUP_BATCH_SIZES = (1, 2)
_WARMUP_TIMESTEPS = 8
_STATE_NAMES = ("h", "c")

# Layers that, at inference, compute each time step from that step alone (or
# leave the time axis untouched), so running them on one step at a time gives
# the same numbers as running them on the whole sequence.
_PER_STEP_LAYERS = (
    keras.layers.Dense,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Masking,
    keras.layers.BatchNormalization,
    keras.layers.Rescaling,
    keras.layers.Identity,
    keras.layers.TimeDistributed,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)
# Keras ops recorded in functional graphs (mask computations among them) that
# work element by element.
_ELEMENTWISE_OPS = frozenset(
    "Abs Absolute Add Cast Clip Cos Divide Equal Exp Greater GreaterEqual Less LessEqual "
    "Log LogicalAnd LogicalNot LogicalOr Maximum Minimum Multiply Negative NotEqual Power "
    "Relu Sigmoid Sign Sin Softplus Sqrt Square Subtract Tanh TrueDivide Where".split()
)
# Keras ops that reduce; per step when they reduce feature axes only.
_REDUCTION_OPS = frozenset("All Any Max Mean Min Prod Sum".split())
# These act per step only when they work along the last (feature) axis.
_LAST_AXIS_LAYERS = (
    keras.layers.Softmax,
    keras.layers.LayerNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Concatenate,
)


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
    _require_tensorflow_backend("export_for_serving")
    if streaming not in (True, False, "auto"):
        raise ValueError(f"`streaming` must be True, False or 'auto', got {streaming!r}.")
    model = _servable_model(model)
    base_dir = os.path.abspath(os.fspath(base_dir))
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ValueError(f"`base_dir` must be a folder, but `{base_dir}` is a file.")
    if warmup:
        _serving_protos()  # say what is missing before any tracing
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
        plan, reason = _stream_plan(model)
        if plan is None and streaming is True:
            raise ValueError(
                f"This model cannot be exported with a streaming `step` signature: {reason} "
                "Pass streaming=False (or 'auto') to export serving_default only."
            )

    from keras_lstm import kernels

    # Portable ops: the export must not need our native kernel's library.
    with kernels.portable_ops():
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
        with kernels.portable_ops(), writer as tmp:
            with _quiet_tensorflow_logger():
                archive.write_out(tmp, verbose=False)
            if warmup:
                _write_warmup(tmp, model, plan, model_name=os.path.basename(base_dir))
    except BaseException:
        if created_base and os.path.isdir(base_dir) and not os.listdir(base_dir):
            shutil.rmtree(base_dir, ignore_errors=True)
        raise
    return writer.path


@contextlib.contextmanager
def _quiet_tensorflow_logger():
    """Hide tf.saved_model.save's "Assets written to <temporary folder>" line."""
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------- checks


def _require_tensorflow_backend(name):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"`{name}` writes TensorFlow graphs and needs the TensorFlow backend; the "
            f"Keras backend is {keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
        )


def _version(version):
    return _checks.positive_int("version", version)


def _next_version(base_dir):
    """One more than the largest version in `base_dir`, 1 if none.

    Entries whose names are not base-10 numbers (`tmp`, `.ipynb_checkpoints`,
    `²`) are not versions, as for TensorFlow Serving.
    """
    if not os.path.isdir(base_dir):
        return 1
    return max(versions(base_dir), default=0) + 1


def _servable_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            "`model` is not built, so its input shape is unknown. Build it first: start it "
            "with `keras.Input(shape=(timesteps, features))`, or call it once on a batch."
        )
    inputs = _model_inputs(model)
    if inputs is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) is a subclassed model without a graph of "
            "inputs, so its input signature is unknown. Wrap it in a functional model: "
            "`inp = keras.Input((None, features)); keras.Model(inp, model(inp))`."
        )
    for tensor in inputs:
        name = _internals.keras_history(tensor)[0].name
        if len(tensor.shape) < 2:
            raise ValueError(
                f"`model` input `{name}` has shape {tuple(tensor.shape)}; expected at least "
                "(batch, features)."
            )
        if tensor.shape[-1] is None:
            raise ValueError(
                f"`model` input `{name}` has an unknown feature size (last axis of shape "
                f"{tuple(tensor.shape)}). A server needs it fixed: build the model with "
                "`keras.Input(shape=(None, features))`."
            )
    stateful = [layer.name for layer in _all_layers(model) if getattr(layer, "stateful", False)]
    if stateful:
        model = _stateless_copy(model, stateful)
    return model


def _model_inputs(model):
    graph = _graph(model)
    return None if graph is None else list(graph.inputs)


def _graph(model):
    """The functional graph behind `model`, or None for a subclassed model."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def _all_layers(model):
    return _internals.layers_within(model)


def _stateless_copy(model, stateful_names):
    """Rebuild `model` from its config with `stateful=False` and copy the weights."""
    how = (
        "A server runs each request from zero state: rebuild the model with stateful=False, "
        "copy the weights with `new.set_weights(model.get_weights())` and export that (the "
        "`step` signature carries state between requests)."
    )
    if _graph(model) is None:
        raise ValueError(
            f"`model` has stateful recurrent layers ({', '.join(stateful_names)}) and is a "
            f"subclassed model that cannot be rebuilt automatically. {how}"
        )
    try:
        config = keras.saving.serialize_keras_object(model)
        config = _rewrite_config(config, stateful=False, batch_size=None)
        copy = keras.saving.deserialize_keras_object(config)
        copy.set_weights(model.get_weights())
    except Exception as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(
            f"`model` has stateful recurrent layers ({', '.join(stateful_names)}) and could "
            f"not be rebuilt from its config with stateful=False "
            f"({type(error).__name__}: {first_line}). {how}"
        ) from error
    warnings.warn(
        f"Layers {', '.join(stateful_names)} are stateful; the export serves a copy with "
        "stateful=False and the same weights. Use the `step` signature to carry state.",
        stacklevel=3,
    )
    return copy


def _rewrite_config(config, *, stateful=None, unroll=None, batch_size="keep", timesteps=None):
    """A copy of a serialized model with recurrent and input options replaced."""
    if isinstance(config, list):
        return [
            _rewrite_config(
                c, stateful=stateful, unroll=unroll, batch_size=batch_size, timesteps=timesteps
            )
            for c in config
        ]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        value = _rewrite_config(
            value, stateful=stateful, unroll=unroll, batch_size=batch_size, timesteps=timesteps
        )
        if key == "stateful" and stateful is not None and isinstance(value, bool):
            value = stateful
        elif key == "unroll" and unroll is not None and isinstance(value, bool):
            value = unroll
        elif key in ("batch_shape", "build_input_shape") and _is_shape(value):
            value = list(value)
            if batch_size != "keep":
                value[0] = batch_size
            if timesteps is not None and len(value) == 3:
                value[1] = timesteps
        out[key] = value
    return out


def _is_shape(value):
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, int) for v in value)


# ------------------------------------------------------------ signatures


def _input_specs(model):
    """One `tf.TensorSpec` per model input: batch and time axes left free.

    The other axes, the feature size among them, are fixed; `_traced`
    makes the signatures check them on every call.
    """
    import tensorflow as tf

    specs = []
    for tensor in _model_inputs(model):
        shape = list(tensor.shape)
        shape[0] = None
        if len(shape) == 3:
            shape[1] = None
        name = _internals.keras_history(tensor)[0].name
        specs.append(tf.TensorSpec(shape, tensor.dtype, name=name))
    return specs


def _output_names(model):
    names = []
    for tensor in _graph(model).outputs:
        operation, node_index, index = _internals.keras_history(tensor)
        count = _internals.node_output_count(operation, node_index)
        names.append(operation.name if count == 1 else f"{operation.name}_{index}")
    seen = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


def _archive(model, plan, jit_compile):
    """An `ExportArchive` holding the model's variables and traced signatures."""
    import tensorflow as tf

    specs = _input_specs(model)
    output_names = _output_names(model)

    def serve(*inputs):
        outputs = model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        return dict(zip(output_names, keras.tree.flatten(outputs), strict=True))

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


# -------------------------------------------------------------- streaming


@dataclass
class _Recurrent:
    layer: keras.layers.RNN
    state_names: list = field(default_factory=list)
    state_shapes: list = field(default_factory=list)


@dataclass
class _StreamPlan:
    """How to run a model's graph one time step at a time."""

    graph: object
    input_spec: object  # tf.TensorSpec of the sequence input
    recurrent: list  # _Recurrent, in graph order
    output_kinds: list  # "sequence" or "final" per model output

    def step_specs(self):
        import tensorflow as tf

        spec = self.input_spec
        specs = [tf.TensorSpec([None, *spec.shape[2:]], spec.dtype, name=spec.name)]
        for rec in self.recurrent:
            for name, shape in zip(rec.state_names, rec.state_shapes, strict=True):
                specs.append(tf.TensorSpec([None, *shape], rec.layer.compute_dtype, name=name))
        return specs

    def initial_state(self, batch_size):
        import tensorflow as tf

        return {
            name: tf.zeros([batch_size, *shape], dtype=rec.layer.compute_dtype)
            for rec in self.recurrent
            for name, shape in zip(rec.state_names, rec.state_shapes, strict=True)
        }

    def step_function(self, output_names):
        def step(x, *flat_states):
            states, offset = {}, 0
            for rec in self.recurrent:
                count = len(rec.state_names)
                states[id(rec.layer)] = list(flat_states[offset : offset + count])
                offset += count
            new_states = {}
            outputs = self.graph._run_through_graph(
                [keras.ops.expand_dims(x, 1)],
                operation_fn=lambda op: self._step_operation(op, states, new_states),
            )
            result = {}
            for name, kind, value in zip(
                output_names, self.output_kinds, keras.tree.flatten(outputs), strict=True
            ):
                result[name] = value[:, 0] if kind == "sequence" else value
            for rec in self.recurrent:
                for name, value in zip(rec.state_names, new_states[id(rec.layer)], strict=True):
                    if name in result:
                        raise ValueError(f"Output name `{name}` is used twice in `step`.")
                    result[name] = value
            return result

        return step

    def _step_operation(self, op, states, new_states):
        if id(op) not in states:

            def call(*args, **kwargs):
                if getattr(op, "_call_has_training_arg", False):
                    kwargs["training"] = False
                return op(*args, **kwargs)

            return call

        def recurrent_step(sequence, mask=None, training=None):
            import tensorflow as tf

            layer = op
            if mask is None:
                mask = _internals.keras_mask(sequence)
            previous = states[id(layer)]
            output, new = layer.cell(sequence[:, 0], previous, training=False)
            new = [tf.cast(s, layer.compute_dtype) for s in keras.tree.flatten(new)]
            output = tf.cast(output, layer.compute_dtype)
            if mask is not None:
                # As in keras.layers.RNN: a masked step keeps the states and
                # repeats the previous output, which for these cells is h.
                keep = tf.cast(mask[:, 0], tf.bool)[:, None]
                new = [tf.where(keep, n, p) for n, p in zip(new, previous, strict=True)]
                if layer.zero_output_for_mask and layer.return_sequences:
                    carried = tf.zeros_like(output)
                else:
                    carried = previous[0]
                output = tf.where(keep, output, carried)
            new_states[id(layer)] = new
            if layer.return_sequences:
                output = output[:, None]
                if mask is not None:
                    _internals.attach_keras_mask(output, mask)
            return [output, *new] if layer.return_state else output

        return recurrent_step


def _streamable_rnn(layer):
    """None if `layer` is a recurrent layer `step` can run, else why not."""
    from keras_lstm.cell import GatedLSTMCell

    cells = (
        GatedLSTMCell,
        keras.layers.LSTMCell,
        keras.layers.GRUCell,
        keras.layers.SimpleRNNCell,
    )
    if not isinstance(layer.cell, cells):
        return (
            f"recurrent layer `{layer.name}` has a {type(layer.cell).__name__} cell; `step` "
            "runs GatedLSTMCell (and Keras LSTM, GRU, SimpleRNN) cells."
        )
    if layer.go_backwards:
        return f"recurrent layer `{layer.name}` reads the sequence backwards (go_backwards=True)."
    return None


def _per_step(layer, rank):
    if not isinstance(layer, keras.layers.Layer):
        kind = type(layer).__name__
        if kind in _ELEMENTWISE_OPS:
            return True
        if kind in _REDUCTION_OPS and rank >= 3 and getattr(layer, "axis", None) is not None:
            axis = layer.axis
            axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
            return all(a % rank >= 2 for a in axes)
        return False
    if isinstance(layer, _PER_STEP_LAYERS):
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.axis in (-1, rank - 1)
        return True
    if isinstance(layer, _LAST_AXIS_LAYERS):
        axis = getattr(layer, "axis", -1)
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        return all(a in (-1, rank - 1) for a in axes)
    return False


def _stream_plan(model):
    """`(plan, None)` if `model` can run step by step, else `(None, reason)`."""
    graph = _graph(model)
    inputs = list(graph.inputs)
    if len(inputs) != 1 or len(inputs[0].shape) != 3:
        return None, "`step` needs a single sequence input of shape (batch, time, features)."
    kinds = {id(inputs[0]): "sequence"}
    recurrent = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            op = node.operation
            in_kinds = {kinds.get(id(t)) for t in node.input_tensors}
            if None in in_kinds:
                return None, f"layer `{op.name}` reads a tensor that does not come from the input."
            if isinstance(op, keras.layers.RNN):
                reason = _streamable_rnn(op)
                extra = [a for a in node.arguments.args[1:] if a is not None] + [
                    name
                    for name in ("initial_state", "constants")
                    if node.arguments.kwargs.get(name) is not None
                ]
                if reason is None and extra:
                    reason = (
                        f"recurrent layer `{op.name}` is given initial_state or constants "
                        "inside the model."
                    )
                if reason is None and in_kinds != {"sequence"}:
                    reason = f"recurrent layer `{op.name}` does not read a sequence."
                if reason:
                    return None, reason
                rec = _Recurrent(op)
                sizes = op.cell.state_size
                sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
                names = _STATE_NAMES if len(sizes) == 2 else ("h",) if len(sizes) == 1 else None
                for i, size in enumerate(sizes):
                    suffix = names[i] if names else f"state{i}"
                    rec.state_names.append(f"{op.name}_{suffix}")
                    rec.state_shapes.append(
                        list(size) if isinstance(size, (list, tuple)) else [int(size)]
                    )
                recurrent.append(rec)
                out_kinds = ["sequence" if op.return_sequences else "final"]
                out_kinds += ["final"] * (len(node.outputs) - 1)
            elif in_kinds == {"final"}:
                out_kinds = ["final"] * len(node.outputs)
            elif in_kinds == {"sequence"} and all(
                _per_step(op, len(t.shape)) for t in node.input_tensors
            ):
                out_kinds = ["sequence"] * len(node.outputs)
            else:
                what = (
                    "mixes a sequence with a tensor that has no time axis"
                    if len(in_kinds) > 1
                    else "may mix time steps"
                )
                return None, (
                    f"layer `{op.name}` ({type(op).__name__}) {what}, so one step at a time "
                    "would not give the same result as the whole sequence."
                )
            for tensor, kind in zip(node.outputs, out_kinds, strict=True):
                kinds[id(tensor)] = kind
    if not recurrent:
        return None, "the model has no recurrent layer, so there is no state to carry."
    names = [name for rec in recurrent for name in rec.state_names]
    clashes = set(names) & set(_output_names(model))
    if len(set(names)) != len(names) or clashes:
        return None, f"state names {sorted(clashes) or names} clash with other names."
    output_kinds = [kinds[id(t)] for t in graph.outputs]
    return _StreamPlan(graph, _input_specs(model)[0], recurrent, output_kinds), None


# ----------------------------------------------------------------- warmup


def _warmup_inputs(model, plan):
    """`(signature, {input name: array})` pairs, random but reproducible.

    Sequences have the model's own length where it declares one (XLA
    compiles once per shape, so warm up the shape traffic will have).
    """
    rng = np.random.default_rng(0)
    declared = [t.shape[1] for t in _model_inputs(model) if len(t.shape) == 3]
    steps = declared[0] if declared and declared[0] is not None else _WARMUP_TIMESTEPS

    def sample(spec, batch):
        shape = [batch] + [steps if d is None else d for d in spec.shape[1:]]
        if spec.dtype.is_floating:
            return rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        return np.zeros(shape, spec.dtype.as_numpy_dtype)

    requests = []
    for batch in _WARMUP_BATCH_SIZES:
        specs = _input_specs(model)
        requests.append(("serving_default", {s.name: sample(s, batch) for s in specs}))
        if plan is not None:
            requests.append(("initial_state", {"batch_size": np.int32(batch)}))
            requests.append(("step", {s.name: sample(s, batch) for s in plan.step_specs()}))
    return requests


def _serving_protos():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError as error:
        raise ImportError(
            "Warmup requests are written with `tensorflow-serving-api`; install it "
            "(`pip install keras-lstm[serving]`) or pass warmup=False (`--no-warmup`)."
        ) from error
    return predict_pb2, prediction_log_pb2


def _write_warmup(export_dir, model, plan, model_name):
    """Write `assets.extra/tf_serving_warmup_requests` as TF Serving reads it."""
    import tensorflow as tf

    predict_pb2, prediction_log_pb2 = _serving_protos()
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in _warmup_inputs(model, plan):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


# ----------------------------------------------------------------- TFLite

# The converter's op sets for the quantized modes that calibrate activations.
QUANTIZED_OPS = {
    "int8": "TFLITE_BUILTINS_INT8",
    "int16x8": "EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",
}
QUANTIZE_MODES = (None, "dynamic", *QUANTIZED_OPS)


def _representative_inputs(model, quantize, data):
    """The calibration inputs as a list (one array per model input), or `None`."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of {QUANTIZE_MODES}, got {quantize!r}.")
    if quantize not in QUANTIZED_OPS:
        if data is not None:
            raise ValueError(
                f"`representative_data` calibrates int8 or int16x8 activations; with "
                f"quantize={quantize!r} it would be ignored."
            )
        return None
    if data is None:
        raise ValueError(
            f"`quantize={quantize!r}` needs `representative_data`: a few hundred typical "
            "inputs, an array (n, timesteps, features), to calibrate the activations."
        )
    names = [_internals.keras_history(t)[0].name for t in _model_inputs(model)]
    if isinstance(data, dict):
        missing = set(names) - set(data)
        if missing:
            raise ValueError(
                f"`representative_data` has no arrays for the inputs {sorted(missing)}; "
                f"give one per input name: {names}."
            )
        arrays = [np.asarray(data[name], dtype="float32") for name in names]
    elif len(names) == 1:
        arrays = [np.asarray(data, dtype="float32")]
    else:
        raise ValueError(
            f"The model has {len(names)} inputs: `representative_data` must be a dict of "
            f"arrays by input name, {names}."
        )
    for name, array in zip(names, arrays, strict=True):
        if array.ndim < 2 or len(array) == 0:
            raise ValueError(
                f"`representative_data` for `{name}` must be a non-empty batch of inputs "
                f"(n, ...), got shape {array.shape}."
            )
    return arrays


def _calibration(arrays, batch):
    """The converter's `representative_dataset`: up to 300 batches of real inputs."""

    def batches():
        for start in range(0, min(len(arrays[0]), 300 * batch) - batch + 1, batch):
            yield [array[start : start + batch] for array in arrays]

    return batches


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    timesteps: int | None = None,
    batch_size: int | None = 1,
    allow_flex: bool = False,
    quantize: str | None = None,
    representative_data=None,
    fused: bool = False,
) -> str:
    """Write `model` as a TFLite flat buffer that `tf.lite.Interpreter` runs.

    With a known sequence length (`timesteps`, or the model's own fixed
    length) the recurrent layers are unrolled over exactly that many steps,
    which converts to builtin TFLite ops (FULLY_CONNECTED, LOGISTIC, TANH,
    ...), with a fixed or free batch size. With no known length the time
    loop is kept as a builtin `WHILE` op, which accepts any length
    (`interpreter.resize_tensor_input`) and, for `GatedLSTM` with the
    standard cell, any batch size. A layer that runs Keras's step loop (a
    cell option, `keras.layers.RNN(GatedLSTMCell)`) over a free length needs a
    fixed `batch_size`, or TensorFlow (Flex) ops: pass `allow_flex=True`,
    and run the result with the Flex delegate linked in.
    Stateful layers are exported stateless, as in `export_for_serving`. The
    file is written atomically and replaces an existing one.

    Args:
        model: A built functional or Sequential `keras.Model`.
        path: Where to write the `.tflite` file.
        timesteps: Sequence length to unroll for. Default: `None`, the
            model's own fixed length, or a free length if it has none.
        batch_size: Fixed batch size, or `None` for a free one. Default: `1`.
        allow_flex: Allow TensorFlow ops the converter cannot turn into
            builtins (free batch and length). Default: `False`.
        quantize: `None` (float32), `"dynamic"` (int8 weights, float
            activations), `"int8"` (int8 weights and activations) or
            `"int16x8"` (int8 weights, int16 activations). The model's inputs
            and outputs stay float32. `"int16x8"` needs a fixed length.
            Default: `None`.
        fused: Write each `GatedLSTM` that TFLite's fused op can express as
            one `UNIDIRECTIONAL_SEQUENCE_LSTM` op (a fixed batch size, no
            mask, no cell option, no `return_state`; each other layer says
            why in a warning). The op keeps its `h` and `c` in TFLite
            variable tensors between invocations: call
            `interpreter.reset_all_variables()` before each new sequence, or
            use that to stream a sequence chunk by chunk. Not with
            `quantize="int16x8"`. Default: `False`.
        representative_data: For `"int8"` and `"int16x8"`: typical inputs
            that calibrate the activation ranges, an array `(n, timesteps,
            features)` (a few hundred windows), or a dict of such arrays by
            input name for a model with several inputs.

    Returns:
        `path`, as a string.

    Example:

    >>> import os, tempfile, keras, numpy as np, tensorflow as tf
    >>> from keras_lstm import GatedLSTM, export_tflite
    >>> model = keras.Sequential(
    ...     [keras.Input((24, 3), name="hours"), GatedLSTM(8), keras.layers.Dense(1, name="y")]
    ... )
    >>> path = export_tflite(model, os.path.join(tempfile.mkdtemp(), "model.tflite"))
    >>> runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    >>> x = np.random.default_rng(0).standard_normal((1, 24, 3)).astype("float32")
    >>> bool(np.allclose(runner(hours=x)["y"], model(x), atol=1e-4))
    True
    """
    _require_tensorflow_backend("export_tflite")
    import tensorflow as tf

    model = _servable_model(model)
    representative = _representative_inputs(model, quantize, representative_data)
    fused = _checks.boolean("fused", fused)
    if timesteps is not None:
        timesteps = _checks.positive_int("timesteps", timesteps)
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    inputs = _model_inputs(model)
    fixed = {t.shape[1] for t in inputs if len(t.shape) == 3} - {None}
    if timesteps is not None and fixed and fixed != {timesteps}:
        raise ValueError(
            f"`timesteps` is {timesteps}, but the model was built for sequences of length "
            f"{sorted(fixed)}."
        )
    if timesteps is None and len(fixed) == 1:
        timesteps = fixed.pop()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"`path` must be a file name, but `{path}` is a folder.")

    config = _rewrite_config(
        keras.saving.serialize_keras_object(model),
        stateful=False,
        batch_size=batch_size,
        timesteps=timesteps,
    )
    fixed_model = keras.saving.deserialize_keras_object(config)
    fixed_model.set_weights(model.get_weights())
    fusable = []
    if fused:
        for layer in _all_layers(fixed_model):
            reason = _tflite_unfused_reason(layer, batch_size)
            if reason == "":
                fusable.append(layer)
            elif reason is not None:
                warnings.warn(
                    f"Layer '{layer.name}' stays a loop in the TFLite model, not "
                    f"UNIDIRECTIONAL_SEQUENCE_LSTM: {reason}.",
                    stacklevel=2,
                )
    if timesteps is not None:  # the other recurrent layers unroll into builtin ops
        for layer in _all_layers(fixed_model):
            if isinstance(layer, keras.layers.RNN) and layer not in fusable:
                layer.unroll = True
    specs = []
    for spec in _input_specs(fixed_model):
        shape = [batch_size, *spec.shape[1:]]
        if len(shape) == 3:
            shape[1] = timesteps
        specs.append(tf.TensorSpec(shape, spec.dtype, name=spec.name))

    import tempfile

    with tempfile.TemporaryDirectory() as saved_model_dir:
        # The SavedModel route freezes the variables into constants; tracing
        # a concrete function directly leaves TFLite resource variables.
        archive = keras.export.ExportArchive()
        archive.track(fixed_model)
        names = _output_names(fixed_model)

        def serve(*tensors):
            outputs = fixed_model(
                tensors[0] if len(tensors) == 1 else list(tensors), training=False
            )
            return dict(zip(names, keras.tree.flatten(outputs), strict=True))

        from keras_lstm import kernels

        # TFLite has no kernel for our native op, nor builtins for TensorList
        # ops at a free batch size.
        with kernels.portable_ops("tflite_fused" if fusable else "no_tensor_lists"):
            archive.add_endpoint("serving_default", serve, input_signature=specs)
            with _quiet_tensorflow_logger():
                archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative is not None:
            converter.representative_dataset = _calibration(representative, batch_size or 1)
            converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, QUANTIZED_OPS[quantize])]
        if allow_flex:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
            _internals.keep_tensor_list_ops(converter)
        try:
            flat_buffer = converter.convert()
        except Exception as error:
            if fusable and "not yet supported for op: 'UNIDIRECTIONAL_SEQUENCE_LSTM'" in str(error):
                raise ValueError(
                    f"`quantize={quantize!r}` is not supported by TFLite's converter for the "
                    "fused LSTM op: pass fused=False."
                ) from None
            if quantize is not None and "calibration" in str(error).lower():
                raise ValueError(
                    f"`quantize={quantize!r}` cannot calibrate this model's time loop: "
                    "give a fixed `timesteps` (the loop is then unrolled)."
                ) from None
            if allow_flex or "tensor list" not in str(error).lower():
                raise
            raise ValueError(
                "With a free sequence length and a free batch size, a layer that runs Keras's "
                "step loop (a cell option, or keras.layers.RNN(GatedLSTMCell)) needs TensorFlow "
                "(Flex) ops: pass batch_size=1, a `timesteps`, or allow_flex=True (the model "
                "then needs the Flex delegate)."
            ) from None

    if fusable:
        flat_buffer, count = _unclipped_fused_lstms(flat_buffer)
        if count < len(fusable):  # what only tracing shows: a mask
            warnings.warn(
                f"{len(fusable) - count} of the {len(fusable)} GatedLSTM layers that "
                "UNIDIRECTIONAL_SEQUENCE_LSTM could express stay a loop in the TFLite "
                "model: they are masked, and the op takes no mask.",
                stacklevel=2,
            )
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flat_buffer)
    return path


def _tflite_unfused_reason(layer, batch_size) -> str | None:
    """Why a layer of ours cannot become TFLite's fused LSTM op; `""` if it can,
    `None` for layers that are not ours. A mask shows only when traced."""
    from keras_lstm.cell import GatedLSTMCell
    from keras_lstm.layer import GatedLSTM

    if not isinstance(layer, keras.layers.RNN) or not isinstance(layer.cell, GatedLSTMCell):
        return None
    if not isinstance(layer, GatedLSTM):
        return "keras.layers.RNN runs Keras's step loop; use GatedLSTM with the same arguments"
    if not layer.cell.is_standard_lstm:
        return "a cell option or activation the op does not compute"
    if layer.return_state:
        return "it returns its states, and the op gives only the output sequence"
    if layer.unroll:
        return "unroll=True"
    if batch_size is None:
        return "the op needs a fixed batch size (batch_size=None)"
    return ""


def _unclipped_fused_lstms(flat_buffer: bytes) -> tuple[bytes, int]:
    """The model with the converter's cell clip (+-10) taken off every fused LSTM.

    The converter sets `cell_clip=10` on each `UNIDIRECTIONAL_SEQUENCE_LSTM`
    it makes from a Keras LSTM, which would clip a cell state that
    `GatedLSTM` lets grow (long lags, `chrono_init`); 0 means no clip, the
    layer's own maths. Returns the model and how many such ops it holds.
    """
    model = _internals.tflite_model_object(flat_buffer)
    options_type = _internals.tflite_schema().BuiltinOptions.UnidirectionalSequenceLSTMOptions
    count = 0
    for subgraph in model.subgraphs:
        for operator in subgraph.operators or []:
            if operator.builtinOptionsType == options_type:
                operator.builtinOptions.cellClip = 0.0
                count += 1
    return _internals.tflite_model_bytes(model), count

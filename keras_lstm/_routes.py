"""Which path runs a `GatedLSTM` call, decided in one place.

The same cell runs through several routes: the native CPU kernel (also as an
XLA custom call), cuDNN on a GPU, `tf.while_loop`s in TensorFlow ops (for XLA,
for GPUs, and in the forms each export's converter can take), and Keras's
step loop around `GatedLSTMCell.call`, which is also the reference the others
are tested against. `resolve(config, context)` picks one from two explicit
descriptions:

- `Config`: what of the layer matters (its options, activations, mask, ...);
- `Context`: where it runs (backend, device, dtype, XLA, export target, and
  whether the native libraries load here).

It returns a `Decision`: the route and, where the route is not the fastest one
the context has, the reason in one sentence. `decide(layer, ...)` reads both
from a layer being traced; `keras-lstm doctor`, the ONNX and TFLite export
warnings and `export_tflite` read the same reasons. Nothing else decides.

Exports are recognised without changing Keras: `exporting(target)` for our
own exporters, Keras's exporters by their frames on the stack while they trace
(`_internals.keras_export_target`), and `tf.saved_model.save` by its context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import threading
import types
import warnings
from typing import NamedTuple

import keras

from keras_lstm import _internals, options


class Route(enum.Enum):
    """The paths a layer's recurrence can take. Each value names a unit that runs it:
    the fused ones in `keras_lstm.kernels` (by this value), the others in `GatedLSTM`."""

    NATIVE = "native"
    NATIVE_XLA = "native_xla"
    CUDNN = "cudnn"
    LOOP = "loop"
    LOOP_XLA = "loop_xla"
    EXPORT_LOOP = "export_loop"
    EXPORT_LENGTHS = "export_lengths"
    NO_TENSOR_LISTS = "no_tensor_lists"
    TFLITE_FUSED = "tflite_fused"
    STEP_LOOP = "step_loop"
    STEP_LOOP_UNROLLED = "step_loop_unrolled"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def fused(self) -> bool:
        """Whether `keras_lstm.kernels.lstm_recurrence` runs it (TensorFlow ops, native op)."""
        return self not in (Route.CUDNN, Route.STEP_LOOP, Route.STEP_LOOP_UNROLLED)


_DESCRIPTIONS = {
    Route.NATIVE: "native kernel",
    Route.NATIVE_XLA: "native kernel as an XLA custom call",
    Route.CUDNN: "cuDNN, through the backend's LSTM that keras.layers.LSTM calls",
    Route.LOOP: "TensorFlow ops (tf.while_loop with its own gradient)",
    Route.LOOP_XLA: "TensorFlow ops under XLA (tf.while_loop, each step projecting its input)",
    Route.EXPORT_LOOP: "a lean tf.while_loop (the form tf2onnx makes ONNX's LSTM op of)",
    Route.EXPORT_LENGTHS: (
        "each row's kept steps gathered to its front, then a lean tf.while_loop over "
        "their number (ONNX's LSTM op with sequence_lens)"
    ),
    Route.NO_TENSOR_LISTS: "a loop without TensorList ops (a builtin WHILE, an OpenVINO Loop)",
    Route.TFLITE_FUSED: "TFLite's UNIDIRECTIONAL_SEQUENCE_LSTM",
    Route.STEP_LOOP: "Keras's step loop around GatedLSTMCell",
    Route.STEP_LOOP_UNROLLED: "Keras's step loop around GatedLSTMCell, unrolled",
}

# The export targets a context can name, and what their converters take.
EXPORT_TARGETS = ("saved_model", "onnx", "litert", "openvino", "tflite", "tflite_fused")
_CONVERTER = {"litert": "LiteRT", "openvino": "OpenVINO", "tflite": "TFLite"}

# The compute dtypes the native kernel takes: float32, and the mixed-precision
# ones, which it runs in float32 (cast in and out).
NATIVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Config:
    """What of a layer (and of this call) the route depends on."""

    changes: tuple[str, ...] = ()  # what differs from the standard LSTM's maths
    not_native: tuple[str, ...] = ()  # the options among them the native kernel lacks
    in_keras_rnn: bool = False  # the cell inside keras.layers.RNN, not GatedLSTM
    unroll: bool = False
    use_bias: bool = True
    recurrent_dropout: bool = False  # in this call (training with a rate)
    use_cudnn: object = "auto"
    masked: bool = False
    fixed_batch: bool = True
    fixed_length: bool = True
    returns_state: bool = False
    go_backwards: bool = False
    return_sequences: bool = False
    pinned: Route | None = None  # set by tests and benchmarks: this route, whatever else

    @classmethod
    def of(cls, layer, mask=None, training=False, shape=(None, None)) -> Config:
        """The `Config` of `layer` (a `GatedLSTM`, or a `keras.layers.RNN` around
        `GatedLSTMCell`) for a call on sequences of `shape` (batch, steps, ...;
        `None` where free) with `mask`."""
        cell = layer.cell
        changes = options.maths_changes(cell) + options.activation_changes(cell)
        return cls(
            changes=tuple(changes),
            not_native=tuple(options.not_in_native_kernel(cell))
            + tuple(c for c in changes if "activation" in c),
            in_keras_rnn=not getattr(layer, "_runs_routes", False),
            unroll=bool(layer.unroll),
            use_bias=cell.use_bias,
            recurrent_dropout=bool(training) and cell.recurrent_dropout > 0,
            use_cudnn=getattr(layer, "use_cudnn", "auto"),
            masked=mask is not None,
            fixed_batch=shape[0] is not None,
            fixed_length=shape[1] is not None,
            returns_state=bool(layer.return_state),
            go_backwards=bool(layer.go_backwards),
            return_sequences=bool(layer.return_sequences),
            pinned=getattr(layer, "_pinned_route", None),
        )


@dataclasses.dataclass(frozen=True)
class Context:
    """Where a call runs. `native` and `native_xla` are `""` where those
    libraries run here, else why not (only asked where they could run)."""

    backend: str = "tensorflow"
    device: str = "cpu"  # "cpu" or "gpu"
    dtype: str = "float32"  # the layer's compute dtype
    xla: bool = False
    export: str = ""  # "" or one of EXPORT_TARGETS
    native: str = ""
    native_xla: str = ""

    @classmethod
    def now(cls, dtype, ask_native: bool = True) -> Context:
        """The context of the graph being traced now (or of this eager call); with
        `ask_native=False` the native libraries are not asked about (nor built)."""
        backend = keras.backend.backend()
        device = "gpu" if _gpu_present(backend) else "cpu"
        dtype = keras.backend.standardize_dtype(dtype)
        if backend != "tensorflow":
            return cls(backend=backend, device=device, dtype=dtype)
        from keras_lstm.kernels._gradients import in_xla_context

        xla, export = in_xla_context(), export_target()
        native = native_xla = ""
        if ask_native and device == "cpu" and not export and dtype in NATIVE_DTYPES:
            native = native_reason()
            if xla and not native:
                native_xla = native_reason(jit_compile=True)
        return cls(backend, device, dtype, xla, export, native, native_xla)


class Decision(NamedTuple):
    route: Route
    reason: str = ""  # why not the fastest route of the context; "" when it is


def resolve(config: Config, context: Context) -> Decision:
    """The route for a call of a layer with `config` in `context`, with the reason
    in one sentence where it is not the fastest the context has."""
    if config.pinned is not None and not (context.export and config.pinned in _NATIVE):
        return Decision(config.pinned, "pinned")
    if context.export:
        return _in_export(config, context)
    if config.unroll:
        return Decision(Route.STEP_LOOP, "unroll=True writes every step out")
    if config.in_keras_rnn:
        return Decision(Route.STEP_LOOP, _KERAS_RNN_FUSED)
    if context.backend != "tensorflow":
        return _on_other_backend(config, context)
    if context.device == "gpu":
        return _on_gpu(config, context)
    return _on_cpu(config, context)


_NATIVE = (Route.NATIVE, Route.NATIVE_XLA)  # never in an export: no runtime has the op
_KERAS_RNN = "keras.layers.RNN runs Keras's step loop around the cell"
_KERAS_RNN_FUSED = f"{_KERAS_RNN}; GatedLSTM with the same arguments runs fused"


def _cudnn_refusal(config: Config, context: Context) -> str:
    """Why cuDNN cannot compute this call exactly, or `""` when it can."""
    if config.changes:
        return f"cuDNN computes the standard LSTM only, not {', '.join(config.changes)}"
    if not config.use_bias:
        return "cuDNN's LSTM has a bias (use_bias=False)"
    if config.recurrent_dropout:
        return "cuDNN has no recurrent dropout"
    if config.use_cudnn is False:
        return "use_cudnn=False"
    if config.masked and context.backend == "tensorflow":
        return "it is masked: cuDNN takes right-padded lengths and zeroes the masked outputs"
    if config.masked:
        return f"it is masked, and Keras's cuDNN LSTM on {context.backend} takes no mask"
    if context.backend == "jax" and config.go_backwards and config.return_sequences:
        return "Keras's cuDNN LSTM on jax returns go_backwards sequences in input order"
    return ""


def _on_other_backend(config: Config, context: Context) -> Decision:
    if context.device == "gpu":
        refusal = _cudnn_refusal(config, context)
        if not refusal:
            return Decision(Route.CUDNN)
        return Decision(Route.STEP_LOOP, refusal)
    return Decision(
        Route.STEP_LOOP,
        f"the fused kernels run on the TensorFlow backend (this one is {context.backend})",
    )


def _in_export(config: Config, context: Context) -> Decision:
    """In an export a reason says what the file loses against its target's best form."""
    target = context.export
    step_loop = _export_step_loop(config, context)
    if step_loop is not None:
        return step_loop
    if target == "onnx":
        return Decision(Route.EXPORT_LENGTHS if config.masked else Route.EXPORT_LOOP)
    if target == "saved_model":
        return Decision(Route.EXPORT_LOOP)
    if target == "tflite_fused":
        if config.returns_state:
            return Decision(
                Route.NO_TENSOR_LISTS,
                "it returns its states, and the op gives only the output sequence",
            )
        if not config.fixed_batch:
            return Decision(Route.NO_TENSOR_LISTS, "the op needs a fixed batch size")
        if config.masked:
            return Decision(Route.NO_TENSOR_LISTS, "it is masked, and the op takes no mask")
        return Decision(Route.TFLITE_FUSED)
    return Decision(Route.NO_TENSOR_LISTS)


def _export_step_loop(config: Config, context: Context) -> Decision | None:
    """The decision for an export of a layer that runs Keras's step loop, or `None`."""
    if config.in_keras_rnn:
        why = f"{_KERAS_RNN}; GatedLSTM with the same arguments exports as the LSTM op"
    elif config.unroll:
        why = "unroll=True writes every step out"
    elif config.changes:
        why = f"its cell ({', '.join(config.changes)}) is not the maths of ONNX's LSTM op"
    else:
        return None
    target = context.export
    if target == "onnx":
        return Decision(Route.STEP_LOOP, why)
    if target == "tflite_fused":
        return _tflite_step_loop(config)
    if target == "saved_model" or config.unroll:
        return Decision(Route.STEP_LOOP)
    if not config.fixed_length:
        converter = _CONVERTER.get(target, "TFLite")
        return Decision(
            Route.STEP_LOOP,
            f"runs Keras's step loop (a cell option, or keras.layers.RNN) over a free "
            f"sequence length, whose TensorList ops the {converter} converter keeps as "
            "TensorFlow ops or refuses. Give the model's Input a fixed length to export it "
            "as plain ops",
        )
    return Decision(Route.STEP_LOOP_UNROLLED)


def _tflite_step_loop(config: Config) -> Decision:
    """A step loop in a TFLite export that fuses what it can: unrolled where the
    length is fixed (`export_tflite` unrolls it then), with why it is not the op."""
    if config.unroll:
        return Decision(Route.STEP_LOOP, "unroll=True")
    if config.in_keras_rnn:
        why = f"{_KERAS_RNN}; use GatedLSTM with the same arguments"
    else:
        why = "a cell option or activation the op does not compute"
    return Decision(Route.STEP_LOOP_UNROLLED if config.fixed_length else Route.STEP_LOOP, why)


def _on_gpu(config: Config, context: Context) -> Decision:
    if config.changes:
        return Decision(
            Route.STEP_LOOP,
            f"on a GPU the fused routes compute the standard LSTM, not {', '.join(config.changes)}",
        )
    if context.xla:
        return Decision(Route.LOOP_XLA, "cuDNN does not run under XLA (jit_compile=False runs it)")
    refusal = _cudnn_refusal(config, context)
    if refusal:
        return Decision(Route.LOOP, refusal)
    return Decision(Route.CUDNN)


def _on_cpu(config: Config, context: Context) -> Decision:
    why_not = ""
    if context.dtype not in NATIVE_DTYPES:
        why_not = f"the native kernel computes float32 (and mixed policies), not {context.dtype}"
    elif context.native:
        why_not = context.native
    elif context.xla and context.native_xla:
        why_not = context.native_xla
    elif config.not_native:
        return Decision(
            Route.STEP_LOOP, f"the native kernel does not compute {', '.join(config.not_native)}"
        )
    if not why_not:
        return Decision(Route.NATIVE_XLA if context.xla else Route.NATIVE)
    if config.changes:
        return Decision(Route.STEP_LOOP, why_not)
    return Decision(Route.LOOP_XLA if context.xla else Route.LOOP, why_not)


# ----------------------------------------------------------------- reading the context


_local = threading.local()


@contextlib.contextmanager
def exporting(target: str = "saved_model"):
    """Within this block the layers trace for an export to `target` (one of
    `EXPORT_TARGETS`): TensorFlow ops only, in the loop form that target's
    converter takes, never the native kernel's op."""
    if target not in EXPORT_TARGETS:
        raise ValueError(f"`target` must be one of {EXPORT_TARGETS}, got {target!r}.")
    previous = getattr(_local, "export", "")
    _local.export = target
    try:
        yield
    finally:
        _local.export = previous


def export_target() -> str:
    """The export the graph traced now is for, or `""`: `exporting()`, else a Keras
    exporter on the stack, else `tf.saved_model.save`."""
    explicit = getattr(_local, "export", "")
    if explicit:
        return explicit
    import tensorflow as tf

    if tf.executing_eagerly():
        return ""
    target = _internals.keras_export_target()
    if target:
        return target
    return "saved_model" if _internals.in_save_context() else ""


@functools.cache
def _gpu_present(backend: str) -> bool:
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def native_reason(jit_compile: bool = False) -> str:
    """`""` where the native kernel (with `jit_compile`, its XLA library) runs
    here, else why not; builds it on first use."""
    from keras_lstm.kernels import _native, _native_xla

    disabled = _native.disabled_reason()
    if disabled is not None:
        return disabled
    loaded, state = _native.native_module, _native._state
    if jit_compile:
        loaded, state = _native_xla.xla_library, _native_xla._state
    if loaded() is not None:  # a failure warns once, in one line, as it happens
        return ""
    error = state.get("error")
    detail = str(error).splitlines()[0] if error is not None and str(error) else "not loaded"
    what = "the native kernel's XLA library" if jit_compile else "the native kernel"
    return f"{what} is unavailable here ({detail})"


def decide(layer, shape, mask, training) -> Decision:
    """The decision for `layer`'s call on sequences of `shape` (batch, steps; `None`
    where free) being traced now; an export that loses something says so in one
    warning naming the layer."""
    config = Config.of(layer, mask, training, shape)
    context = Context.now(layer.compute_dtype, ask_native=_may_run_native(config))
    decision = resolve(config, context)
    if decision.reason and context.export in ("onnx", "litert", "openvino"):
        warn_export(layer.name, decision, context.export)
    if config.use_cudnn is True and decision.route is not Route.CUDNN and not context.export:
        refuse_cudnn(layer.name, decision)
    return decision


def _may_run_native(config: Config) -> bool:
    """Whether the native kernel's state matters to `config`'s route (asking builds it)."""
    return not (config.in_keras_rnn or config.unroll or config.not_native or config.pinned)


def refuse_cudnn(name: str, decision: Decision):
    """`use_cudnn=True` where cuDNN does not run: one `ValueError` with the reason."""
    raise ValueError(
        f"`use_cudnn=True` but layer '{name}' cannot run cuDNN here: it runs "
        f"{decision.route.description} ({decision.reason or 'the fastest route here'}). "
        "Pass use_cudnn='auto' to fall back."
    )


def export_warning(name: str, decision: Decision, target: str) -> str:
    """The one line an export says about a layer that loses its best form."""
    if target == "onnx":
        return f"Layer '{name}' exports as an ONNX Loop, not ONNX's LSTM op: {decision.reason}."
    if target == "tflite_fused":
        return (
            f"Layer '{name}' stays a loop in the TFLite model, not "
            f"UNIDIRECTIONAL_SEQUENCE_LSTM: {decision.reason}."
        )
    return f"Layer '{name}' {decision.reason}."


def warn_export(name: str, decision: Decision, target: str) -> None:
    warnings.warn(export_warning(name, decision, target), stacklevel=4)


def follow_routes(rnn) -> None:
    """Makes a `keras.layers.RNN` around `GatedLSTMCell` take its route from `decide`.

    The one hook into Keras, on that layer alone (no Keras function or class
    changes): its `inner_loop`, the method `keras.layers.RNN.call` runs the
    recurrence with, becomes one that asks `decide` first. The route is then
    Keras's step loop, unrolled in exports to converters that cannot take its
    TensorList ops (LiteRT, OpenVINO) where the length is fixed, with the
    warning an export gives for a layer it cannot fuse. `GatedLSTMCell.build`
    calls it; `tests/test_keras_export.py` fails if Keras stops calling it.
    """
    if "inner_loop" in rnn.__dict__:
        return
    # A method bound to the layer: a copy of the layer (copy, deepcopy) binds its own.
    rnn.inner_loop = types.MethodType(_routed_inner_loop, rnn)


def _routed_inner_loop(rnn, sequences, initial_state, mask, training=False):
    """`keras.layers.RNN.inner_loop`, once `decide` has said which way it runs."""
    first_mask = mask[0] if keras.tree.is_nested(mask) else mask
    decision = decide(rnn, tuple(sequences.shape)[:2], first_mask, training)
    keras_inner_loop = type(rnn).inner_loop
    if decision.route is not Route.STEP_LOOP_UNROLLED or rnn.unroll:
        return keras_inner_loop(rnn, sequences, initial_state, mask, training=training)
    rnn.unroll = True
    try:
        return keras_inner_loop(rnn, sequences, initial_state, mask, training=training)
    finally:
        rnn.unroll = False


_routed_inner_loop.keras_lstm_routes = True

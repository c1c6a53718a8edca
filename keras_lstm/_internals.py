"""Every place keras_lstm reaches into Keras's or TensorFlow's private code.

Keras and TensorFlow keep no promise about these names across releases, so
they live here, each behind a small function, and nowhere else in the
package. `smoke_check()` exercises each one against the installed versions
and names what broke (`tests/test_internals.py` runs it); the rest of the
package only calls the functions below. Importing this module imports
neither TensorFlow nor Keras: each function imports what it needs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

# ----------------------------------------------------------------- Keras exporters

# Keras's exporters, by the name `keras.Model.export` imports them under from
# `keras.src.export` when it is called.
KERAS_EXPORTERS = ("export_onnx", "export_openvino", "export_litert", "export_saved_model")
# The exporters whose converters cannot take TensorList ops at a free batch size.
NO_TENSOR_LISTS = {"export_litert": "LiteRT", "export_openvino": "OpenVINO"}


def portable_keras_exports() -> list[str]:
    """Makes Keras's own exporters trace the fused LSTM op with TensorFlow ops only.

    The native kernel's op must never reach an exported artifact. A SavedModel
    is traced inside `tf.saved_model.save`, which the op recognises; but
    `model.export(format="onnx")` traces outside it (tf2onnx converts the
    function directly), and the ONNX file would hold an op that no runtime
    has. Each exporter is wrapped to run inside
    `keras_lstm.kernels.portable_ops()`, both where `keras.Model.export`
    imports it (`keras.src.export`) and in its own module (where Keras's tests
    call it). The LiteRT and OpenVINO exporters also get loops without
    TensorList ops (see `step_loops_unrolled`). Returns the names wrapped now.
    """
    import importlib

    import keras.src.export as export

    wrapped = []
    for name in KERAS_EXPORTERS:
        try:  # a Keras release without this exporter has nothing to wrap
            module = importlib.import_module(f"keras.src.export.{name.removeprefix('export_')}")
        except ImportError:
            continue
        for owner in (export, module):
            exporter = getattr(owner, name, None)
            if exporter is None or getattr(exporter, "keras_lstm_portable", False):
                continue
            setattr(owner, name, _portable(exporter, name))
            wrapped.append(f"{owner.__name__}.{name}")
    return wrapped


def _portable(exporter, name):
    from keras_lstm.kernels import portable_ops

    @functools.wraps(exporter)
    def portable(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        if name == "export_onnx":
            for reason in onnx_loop_reasons(model):
                warnings.warn(reason, stacklevel=3)
            with portable_ops("inference"), _onnx_export():
                return exporter(*args, **kwargs)
        if name not in NO_TENSOR_LISTS:
            with portable_ops("inference"):
                return exporter(*args, **kwargs)
        with portable_ops("no_tensor_lists"), step_loops_unrolled(model, name):
            return exporter(*args, **kwargs)

    portable.keras_lstm_portable = True
    return portable


# ----------------------------------------------------------------- Keras layers


def dropout_rnn_cell():
    """Keras's mixin that gives a cell `get_dropout_mask` and friends, as `LSTMCell` has."""
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

    return DropoutRNNCell


def never_autocast(variable) -> None:
    """Keep `variable` in its own dtype when read under a mixed-precision policy.

    A stateful layer's state must: under the torch backend an autocast
    variable's `assign()` inside `call()` writes into a cast copy.
    """
    variable._autocast = False


def keras_mask(tensor):
    """The mask Keras attached to `tensor` (a `Masking` or `Embedding(mask_zero=True)` output)."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(tensor)


def attach_keras_mask(tensor, mask) -> None:
    from keras.src.backend import set_keras_mask

    set_keras_mask(tensor, mask)


def first_call_arguments(layer):
    """The arguments (`.args`, `.kwargs`) of `layer`'s first call in a functional graph."""
    return layer._inbound_nodes[0].arguments


def keras_history(tensor):
    """`(operation, node_index, tensor_index)`: where a symbolic Keras tensor was made."""
    return tensor._keras_history


def node_output_count(operation, node_index: int) -> int:
    return len(operation._inbound_nodes[node_index].outputs)


# ----------------------------------------------------------------- TensorFlow


def in_save_context() -> bool:
    """Whether TensorFlow is tracing inside `tf.saved_model.save` now."""
    from tensorflow.python.saved_model import save_context

    return save_context.in_save_context()


def in_xla_context(graph) -> bool:
    """Whether ops built in `graph` are compiled by XLA (`jit_compile=True`)."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(graph)


def keep_tensor_list_ops(converter) -> None:
    """Ask TFLite's converter to keep TensorList ops as TensorFlow (Flex) ops."""
    converter._experimental_lower_tensor_list_ops = False


def tflite_schema():
    """TFLite's flat buffer schema, as generated Python (`BuiltinOptions`, ...)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def tflite_model_object(flat_buffer: bytes):
    """A `.tflite` flat buffer as an editable object tree (`ModelT`)."""
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.convert_bytearray_to_object(bytearray(flat_buffer))


def tflite_model_bytes(model) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# ----------------------------------------------------------------- saved lambdas


class LambdaRefused(ValueError):
    """A saved Python lambda that safe mode does not load."""


def saved_lambda(value):
    """The function of a Python lambda as Keras saves one, or `None` if `value` is not one.

    Keras writes a lambda activation into a config as `{"value": [code,
    defaults, closure]}` (base64 bytecode) and, on load, no longer
    recognises it (`keras.layers.LSTM` cannot load its own). Here it loads
    where Keras's safe mode is off (`load_model(..., safe_mode=False)` or
    `keras.config.enable_unsafe_deserialization()`), and raises
    `LambdaRefused` otherwise.
    """
    if not (
        isinstance(value, dict)
        and set(value) == {"value"}
        and isinstance(value["value"], list | tuple)
        and value["value"]
        and isinstance(value["value"][0], str)
    ):
        return None
    from keras.src.saving import serialization_lib
    from keras.src.utils import python_utils

    if serialization_lib.in_safe_mode() is not False:
        raise LambdaRefused("safe mode refuses to load a Python lambda")
    return python_utils.func_load(*value["value"])


# ----------------------------------------------------------------- Keras models


def layers_within(model) -> list:
    """Every layer inside `model`, nested ones (a `Bidirectional`'s two) included."""
    return list(model._flatten_layers(include_self=False, recursive=True))


_onnx = threading.local()


@contextlib.contextmanager
def _onnx_export():
    previous = getattr(_onnx, "active", False)
    _onnx.active = True
    try:
        yield
    finally:
        _onnx.active = previous


def exporting_onnx() -> bool:
    """Whether Keras's ONNX exporter is tracing now."""
    return getattr(_onnx, "active", False)


def onnx_loop_reasons(model) -> list[str]:
    """One line per layer of ours that an ONNX export keeps as a `Loop`, with the reason.

    tf2onnx fuses `GatedLSTM`'s loop into ONNX's `LSTM` op when the cell is
    the standard LSTM (see `kernels._while_loop.lstm_sequence_for_inference`). A
    masked layer is named when it is traced (`GatedLSTM.inner_loop`).
    """
    import keras

    from keras_lstm.cell import GatedLSTMCell
    from keras_lstm.layer import GatedLSTM

    reasons = []
    for layer in layers_within(model) if model is not None else []:
        if not isinstance(layer, keras.layers.RNN) or not isinstance(layer.cell, GatedLSTMCell):
            continue
        if not isinstance(layer, GatedLSTM):
            why = (
                "keras.layers.RNN runs Keras's step loop around the cell; GatedLSTM with the "
                "same arguments exports as the LSTM op"
            )
        elif layer.unroll:
            why = "unroll=True writes every step out"
        elif not layer.cell.is_standard_lstm:
            why = f"its cell ({_cell_changes(layer.cell)}) is not the maths of ONNX's LSTM op"
        else:
            continue
        reasons.append(f"Layer '{layer.name}' exports as an ONNX Loop, not ONNX's LSTM op: {why}.")
    return reasons


def _cell_changes(cell) -> str:
    import keras

    changes = [
        name
        for name, on in [
            ("peephole", cell.peephole),
            ("layer_norm", cell.layer_norm),
            ("cifg", cell.cifg),
            ("proj_units", cell.proj_units is not None),
            ("zoneout_h", cell.zoneout_h > 0),
            ("zoneout_c", cell.zoneout_c > 0),
            ("cell_clip", cell.cell_clip is not None),
        ]
        if on
    ]
    for name in ("activation", "recurrent_activation"):
        value = keras.activations.serialize(getattr(cell, name))
        if value != {"activation": "tanh", "recurrent_activation": "sigmoid"}[name]:
            changes.append(f"{name}={value!r}")
    return ", ".join(changes)


@contextlib.contextmanager
def step_loops_unrolled(model, exporter="export_litert"):
    """For LiteRT and OpenVINO exports: our cells' step loops run unrolled at a fixed length.

    Keras's step loop (`keras.layers.RNN`, which `GatedLSTM` uses for the
    cell options) keeps its outputs in a `tf.TensorArray`. With a free batch
    size TFLite's converter keeps those as TensorFlow (Flex) ops, which
    LiteRT's interpreter does not run, and OpenVINO's converter refuses them
    (as both do for `keras.layers.LSTM`). Unrolled over a fixed length they
    are plain ops. A free length stays a loop: one warning names the layer.
    """
    target = NO_TENSOR_LISTS[exporter]
    import keras

    from keras_lstm.cell import GatedLSTMCell
    from keras_lstm.layer import GatedLSTM

    patched = []
    for layer in layers_within(model) if model is not None else []:
        if not isinstance(layer, keras.layers.RNN) or not isinstance(layer.cell, GatedLSTMCell):
            continue
        if layer.unroll:
            continue

        def inner_loop(sequences, initial_state, mask, training=False, _layer=layer):
            fused = isinstance(_layer, GatedLSTM) and _layer._runs_fused_kernel(training)
            if fused:  # the fused op's own loop converts to builtins
                return type(_layer).inner_loop(_layer, sequences, initial_state, mask, training)
            if sequences.shape[1] is None:
                warnings.warn(
                    f"Layer '{_layer.name}' runs Keras's step loop (a cell option, or "
                    "keras.layers.RNN) over a free sequence length, whose TensorList ops "
                    f"the {target} converter keeps as TensorFlow ops or refuses. Give the "
                    "model's Input a fixed length to export it as plain ops.",
                    stacklevel=2,
                )
                return type(_layer).inner_loop(_layer, sequences, initial_state, mask, training)
            _layer.unroll = True
            try:
                return type(_layer).inner_loop(_layer, sequences, initial_state, mask, training)
            finally:
                _layer.unroll = False

        layer.inner_loop = inner_loop
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.inner_loop


# ----------------------------------------------------------------- smoke check


def smoke_check() -> list[str]:
    """Exercise every private use above against the installed Keras and TensorFlow.

    Returns one line per use that broke (its function, and the error), or an
    empty list. Needs the TensorFlow backend.
    """
    import keras
    import numpy as np

    problems = []

    def check(name, run):
        try:
            run()
        except Exception as error:  # any failure is the news
            problems.append(f"{name}: {type(error).__name__}: {error}")

    def cell_mixin():
        assert hasattr(dropout_rnn_cell(), "get_dropout_mask")

    def variable_autocast():
        variable = keras.Variable(np.zeros(2, "float32"))
        never_autocast(variable)
        assert variable._autocast is False

    inputs = keras.Input((3, 2))
    masked = keras.layers.Masking()(inputs)
    dense = keras.layers.Dense(1)
    outputs = dense(masked)
    model = keras.Model(inputs, outputs)

    def masks():
        import tensorflow as tf

        tensor, mask = tf.zeros((1, 3, 2)), tf.ones((1, 3), tf.bool)
        attach_keras_mask(tensor, mask)
        assert keras_mask(tensor) is mask

    def graph_records():
        assert first_call_arguments(dense).args[0] is masked
        operation, node_index, _ = keras_history(outputs)
        assert operation is dense and node_output_count(operation, node_index) == 1
        assert dense in layers_within(model)

    def tensorflow_contexts():
        import tensorflow as tf

        assert in_save_context() is False
        seen = []
        tf.function(
            lambda: seen.append(in_xla_context(tf.compat.v1.get_default_graph())), jit_compile=True
        ).get_concrete_function()
        assert seen == [True]

    def converter_flag():
        import tensorflow as tf

        function = tf.function(lambda x: x + 1).get_concrete_function(tf.TensorSpec((1,)))
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
        assert hasattr(converter, "_experimental_lower_tensor_list_ops")
        keep_tensor_list_ops(converter)

    def lambdas():
        from keras.src.saving import serialization_lib
        from keras.src.utils import python_utils

        assert serialization_lib.in_safe_mode() is None
        code = python_utils.func_dump(lambda x: x + 1)
        assert python_utils.func_load(*code)(1) == 2

    def exporters():
        import importlib

        for name in KERAS_EXPORTERS:
            module = importlib.import_module(f"keras.src.export.{name.removeprefix('export_')}")
            assert callable(getattr(module, name)), name

    for name, run in [
        ("dropout_rnn_cell", cell_mixin),
        ("never_autocast", variable_autocast),
        ("keras_mask/attach_keras_mask", masks),
        ("first_call_arguments/keras_history/node_output_count/layers_within", graph_records),
        ("in_save_context/in_xla_context", tensorflow_contexts),
        ("keep_tensor_list_ops", converter_flag),
        ("saved_lambda", lambdas),
        ("portable_keras_exports", exporters),
    ]:
        check(name, run)
    return problems

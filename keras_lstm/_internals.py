"""Every place keras_lstm reaches into Keras's or TensorFlow's private code.

Keras and TensorFlow keep no promise about these names across releases, so
they live here, each behind a small function, and nowhere else in the
package. `smoke_check()` exercises each one against the installed versions
and names what broke (`tests/test_internals.py` runs it); the rest of the
package only calls the functions below. Importing this module imports
neither TensorFlow nor Keras: each function imports what it needs.
"""

from __future__ import annotations

# ----------------------------------------------------------------- Keras exporters

# Keras's exporter modules (`keras/src/export/NAME.py`) by the target they export to.
# `ExportArchive` (in `saved_model.py`, or its own module) traces under all of them.
KERAS_EXPORT_MODULES = {
    "onnx": "onnx",
    "litert": "litert",
    "openvino": "openvino",
    "saved_model": "saved_model",
    "saved_model_export_archive": "saved_model",
}


def keras_export_target() -> str:
    """The target of the Keras exporter tracing now (`"onnx"`, `"litert"`,
    `"openvino"`, `"saved_model"`), or `""`: read from the outermost frame on the
    stack that runs code of one of Keras's exporter modules. Keras is not changed."""
    import os
    import sys

    folder = _keras_export_folder()
    target = ""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(folder):
            stem = os.path.splitext(os.path.basename(path))[0]
            target = KERAS_EXPORT_MODULES.get(stem, target)
        frame = frame.f_back
    return target


_EXPORT_FOLDER: list[str] = []


def _keras_export_folder() -> str:
    if not _EXPORT_FOLDER:
        import os

        import keras.src.export as export

        _EXPORT_FOLDER.append(os.path.join(os.path.dirname(export.__file__), ""))
    return _EXPORT_FOLDER[0]


def backend_lstm():
    """The backend's LSTM that `keras.layers.LSTM` calls (cuDNN where it can run, else
    `NotImplementedError`), taking `keras.layers.LSTM.inner_loop`'s arguments."""
    from keras.src import backend

    return backend.lstm


def layer_building(cell):
    """The `keras.layers.RNN` whose `build` is building `cell` now (found on the
    stack), or `None`."""
    import sys

    import keras

    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.layers.RNN) and owner.cell is cell:
            return owner
    return None


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


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its CPU ops through oneDNN in this process
    (`TF_ENABLE_ONEDNN_OPTS`, on by default on x86-64 Linux)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


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


# ----------------------------------------------------------------- smoke check


def _probe_dropout_rnn_cell():
    """`dropout_rnn_cell()` is the mixin that gives a cell `get_dropout_mask`."""
    assert hasattr(dropout_rnn_cell(), "get_dropout_mask")


def _probe_never_autocast():
    """`never_autocast` turns off a variable's `_autocast`."""
    import keras
    import numpy as np

    variable = keras.Variable(np.zeros(2, "float32"))
    never_autocast(variable)
    assert variable._autocast is False


def _probe_keras_mask():
    """`attach_keras_mask` attaches the mask that `keras_mask` reads back."""
    import tensorflow as tf

    tensor, mask = tf.zeros((1, 3, 2)), tf.ones((1, 3), tf.bool)
    attach_keras_mask(tensor, mask)
    assert keras_mask(tensor) is mask


def _probe_graph_records():
    """A functional graph's call arguments, tensor histories and nested layers read back."""
    import keras

    inputs = keras.Input((3, 2))
    masked = keras.layers.Masking()(inputs)
    dense = keras.layers.Dense(1)
    outputs = dense(masked)
    model = keras.Model(inputs, outputs)
    assert first_call_arguments(dense).args[0] is masked
    operation, node_index, _ = keras_history(outputs)
    assert operation is dense and node_output_count(operation, node_index) == 1
    assert dense in layers_within(model)


def _probe_tensorflow_contexts():
    """The save, oneDNN and XLA context queries answer, and XLA is seen under `jit_compile`."""
    import tensorflow as tf

    assert in_save_context() is False
    assert isinstance(onednn_enabled(), bool)
    seen = []
    tf.function(
        lambda: seen.append(in_xla_context(tf.compat.v1.get_default_graph())), jit_compile=True
    ).get_concrete_function()
    assert seen == [True]


def _probe_keep_tensor_list_ops():
    """TFLite's converter still has the TensorList flag that `keep_tensor_list_ops` sets."""
    import tensorflow as tf

    function = tf.function(lambda x: x + 1).get_concrete_function(tf.TensorSpec((1,)))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    assert hasattr(converter, "_experimental_lower_tensor_list_ops")
    keep_tensor_list_ops(converter)


def _probe_tflite_flat_buffers():
    """A converted flat buffer round-trips through TFLite's schema and object tree."""
    import tensorflow as tf

    function = tf.function(lambda x: x + 1).get_concrete_function(tf.TensorSpec((1,)))
    flat_buffer = tf.lite.TFLiteConverter.from_concrete_functions([function]).convert()
    model = tflite_model_object(flat_buffer)
    assert model.subgraphs and hasattr(
        tflite_schema().BuiltinOptions, "UnidirectionalSequenceLSTMOptions"
    )
    assert tflite_model_bytes(model)


def _probe_saved_lambda():
    """Keras's safe-mode flag and lambda (de)serialisation, which `saved_lambda` uses."""
    from keras.src.saving import serialization_lib
    from keras.src.utils import python_utils

    assert serialization_lib.in_safe_mode() is None
    code = python_utils.func_dump(lambda x: x + 1)
    assert python_utils.func_load(*code)(1) == 2


def _probe_keras_export_target():
    """`keras_export_target` names the exporter tracing now; `backend_lstm` is callable."""
    # Keras's exporters trace under their own modules (here `saved_model.py`).
    import os
    import tempfile

    import keras

    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(keras_export_target())
            return x

    probe = keras.Sequential([keras.Input((2,)), Probe()])
    seen.clear()  # building the model called it outside any export
    with tempfile.TemporaryDirectory() as folder:
        probe.export(os.path.join(folder, "probe"), format="tf_saved_model", verbose=False)
    assert seen and set(seen) == {"saved_model"}, seen
    assert keras_export_target() == ""
    assert callable(backend_lstm())


# What `smoke_check` runs: the private uses each probe covers, and the probe.
_PROBES = (
    ("dropout_rnn_cell", _probe_dropout_rnn_cell),
    ("never_autocast", _probe_never_autocast),
    ("keras_mask/attach_keras_mask", _probe_keras_mask),
    ("first_call_arguments/keras_history/node_output_count/layers_within", _probe_graph_records),
    ("in_save_context/in_xla_context/onednn_enabled", _probe_tensorflow_contexts),
    ("keep_tensor_list_ops", _probe_keep_tensor_list_ops),
    ("tflite_schema/tflite_model_object/tflite_model_bytes", _probe_tflite_flat_buffers),
    ("saved_lambda", _probe_saved_lambda),
    ("keras_export_target/backend_lstm", _probe_keras_export_target),
)


def smoke_check() -> list[str]:
    """Exercise every private use above against the installed Keras and TensorFlow.

    Returns one line per use that broke (its function, and the error), or an
    empty list. Needs the TensorFlow backend.
    """
    problems = []
    for name, probe in _PROBES:
        try:
            probe()
        except Exception as error:  # any failure is the news
            problems.append(f"{name}: {type(error).__name__}: {error}")
    return problems

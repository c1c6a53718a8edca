"""Where keras_lstm reaches into Keras's private modules, so that one smoke test guards it.

`tests/test_keras_export.py::test_keras_exporters_are_wrapped_to_trace_portable_ops`
checks each use here against the installed Keras and names what broke when a
release moves it. (Other private uses, in the layer, serving and introspection
modules, are still to move here.)
"""

from __future__ import annotations

import contextlib
import functools
import warnings

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
        if name not in NO_TENSOR_LISTS:
            with portable_ops():
                return exporter(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        with portable_ops(tensor_lists=False), step_loops_unrolled(model, name):
            return exporter(*args, **kwargs)

    portable.keras_lstm_portable = True
    return portable


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


def layers_within(model) -> list:
    """Every layer inside `model`, nested ones (a `Bidirectional`'s two) included."""
    return list(model._flatten_layers(include_self=False, recursive=True))


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

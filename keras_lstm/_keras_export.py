"""Keras's own exporters (`model.export(path, format=...)`) made to export our layers.

Importing `keras_lstm` calls `install()`, which wraps each Keras exporter so
that the model is traced with TensorFlow's own ops (never the native
kernel's op), in the loop form the target's converter can take:

- ONNX: the lean loop tf2onnx fuses into ONNX's `LSTM` op, with a warning
  naming each layer it cannot fuse and why (`onnx_loop_reasons`);
- LiteRT and OpenVINO: a loop without TensorList ops, and Keras's step
  loops around our cells unrolled where the length is fixed
  (`step_loops_unrolled`);
- SavedModel: the lean loop.

The private Keras names this needs (where the exporters live) are in
`_internals`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import keras

from keras_lstm import _internals
from keras_lstm.cell import GatedLSTMCell
from keras_lstm.kernels import portable_ops
from keras_lstm.layer import GatedLSTM

# The exporters whose converters cannot take TensorList ops at a free batch size.
NO_TENSOR_LISTS = {"export_litert": "LiteRT", "export_openvino": "OpenVINO"}


def install() -> list[str]:
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
    wrapped = []
    for name in _internals.KERAS_EXPORTERS:
        for owner in _internals.keras_exporter_owners(name):
            exporter = getattr(owner, name, None)
            if exporter is None or getattr(exporter, "keras_lstm_portable", False):
                continue
            setattr(owner, name, _portable(exporter, name))
            wrapped.append(f"{owner.__name__}.{name}")
    return wrapped


def _portable(exporter, name):
    @functools.wraps(exporter)
    def portable(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        if name == "export_onnx":
            for reason in onnx_loop_reasons(model):
                warnings.warn(reason, stacklevel=3)
            with portable_ops("onnx"):
                return exporter(*args, **kwargs)
        if name not in NO_TENSOR_LISTS:
            with portable_ops("inference"):
                return exporter(*args, **kwargs)
        with portable_ops("no_tensor_lists"), step_loops_unrolled(model, name):
            return exporter(*args, **kwargs)

    portable.keras_lstm_portable = True
    return portable


def onnx_loop_reasons(model) -> list[str]:
    """One line per layer of ours that an ONNX export keeps as a `Loop`, with the reason.

    tf2onnx fuses `GatedLSTM`'s loop into ONNX's `LSTM` op when the cell is
    the standard LSTM (see `kernels._while_loop.lstm_sequence_for_inference`). A
    masked layer is named when it is traced (`GatedLSTM.inner_loop`).
    """
    reasons = []
    for layer in _internals.layers_within(model) if model is not None else []:
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
    changes = cell.options_changing_maths()
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
    patched = []
    for layer in _internals.layers_within(model) if model is not None else []:
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

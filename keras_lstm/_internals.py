"""Where keras_lstm reaches into Keras's private modules, so that one smoke test guards it.

`tests/test_keras_export.py::test_keras_exporters_are_wrapped_to_trace_portable_ops`
checks each use here against the installed Keras and names what broke when a
release moves it. (Other private uses, in the layer, serving and introspection
modules, are still to move here.)
"""

from __future__ import annotations

import functools

# Keras's exporters, by the name `keras.Model.export` imports them under from
# `keras.src.export` when it is called.
KERAS_EXPORTERS = ("export_onnx", "export_openvino", "export_litert", "export_saved_model")


def portable_keras_exports() -> list[str]:
    """Makes Keras's own exporters trace the fused LSTM op with TensorFlow ops only.

    The native kernel's op must never reach an exported artifact. A SavedModel
    is traced inside `tf.saved_model.save`, which the op recognises; but
    `model.export(format="onnx")` traces outside it (tf2onnx converts the
    function directly), and the ONNX file would hold an op that no runtime
    has. Each exporter of `keras.src.export` is wrapped to run inside
    `keras_lstm.kernels.portable_ops()`. Returns the names wrapped now.
    """
    import keras.src.export as export

    from keras_lstm.kernels import portable_ops

    wrapped = []
    for name in KERAS_EXPORTERS:
        exporter = getattr(export, name, None)
        if exporter is None or getattr(exporter, "keras_lstm_portable", False):
            continue

        @functools.wraps(exporter)
        def portable(*args, _exporter=exporter, **kwargs):
            with portable_ops():
                return _exporter(*args, **kwargs)

        portable.keras_lstm_portable = True
        setattr(export, name, portable)
        wrapped.append(name)
    return wrapped

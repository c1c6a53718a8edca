"""keras-lstm: an LSTM for Keras 3 whose gates are code you can read.

Public names:

- `GatedLSTMCell`: one LSTM step, a drop-in for `keras.layers.LSTMCell`.
- `GatedLSTM`: the recurrent layer, a drop-in for `keras.layers.LSTM`.
- `LSTMGates`: the gate values of one step (`GatedLSTMCell.call(..., return_gates=True)`).
- `pad_to_bucket`: pads variable-length sequences to a few lengths, with a mask.
- `trace_gates`, `plot_gates`: every gate and state of a model's LSTM layers over time.
- `from_torch`, `to_torch`, `from_keras`: move weights from and to `torch.nn.LSTM`
  and `keras.layers.LSTM`.
- `export_for_serving`: write a TensorFlow Serving version (whole-sequence and streaming).
- `export_tflite`: write a TFLite model.
"""

from keras_lstm._padding import pad_to_bucket
from keras_lstm.cell import GatedLSTMCell, LSTMGates
from keras_lstm.interop import from_keras, from_torch, to_torch
from keras_lstm.introspect import plot_gates, trace_gates
from keras_lstm.layer import GatedLSTM
from keras_lstm.serving import export_for_serving, export_tflite

__version__ = "0.1.0"


__all__ = [
    "GatedLSTM",
    "GatedLSTMCell",
    "LSTMGates",
    "__version__",
    "export_for_serving",
    "export_tflite",
    "from_keras",
    "from_torch",
    "pad_to_bucket",
    "plot_gates",
    "to_torch",
    "trace_gates",
]

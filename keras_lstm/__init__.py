"""keras-lstm: an LSTM for Keras 3 whose gates are code you can read.

Public names:

- `GatedLSTMCell`: one LSTM step, a drop-in for `keras.layers.LSTMCell`.
- `GatedLSTM`: the recurrent layer, a drop-in for `keras.layers.LSTM`.
- `LSTMGates`: the gate values of one step (`GatedLSTMCell.call(..., return_gates=True)`).
- `export_for_serving`: write a TensorFlow Serving version (whole-sequence and streaming).
- `export_tflite`: write a TFLite model.
"""

from keras_lstm.cell import GatedLSTMCell, LSTMGates
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
]

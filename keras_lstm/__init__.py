"""keras-lstm: an LSTM for Keras 3 whose gates are code you can read.

Public names:

- `GatedLSTMCell`: one LSTM step, a drop-in for `keras.layers.LSTMCell`.
- `GatedLSTM`: the recurrent layer, a drop-in for `keras.layers.LSTM`.
- `LSTMGates`: the gate values of one step (`GatedLSTMCell.call(..., return_gates=True)`).
- `pad_to_bucket`: pads variable-length sequences to a few lengths, with a mask.
"""

from keras_lstm.cell import GatedLSTMCell, LSTMGates
from keras_lstm.kernels._padding import pad_to_bucket
from keras_lstm.layer import GatedLSTM

__version__ = "0.1.0"

__all__ = ["GatedLSTM", "GatedLSTMCell", "LSTMGates", "__version__", "pad_to_bucket"]

"""Export a Keras model for TensorFlow Serving (SavedModel) and for TFLite.

`export_for_serving` writes the layout TensorFlow Serving watches,
`base_dir/<version>/`, with three signatures:

- `serving_default`: whole sequences in, the model's outputs out.
- `step`: one time step and every recurrent layer's states in, the outputs
  and the new states out, so a server can run an endless stream while the
  client holds the state between requests.
- `initial_state`: the zero states for a batch size, to start a stream.

`export_tflite` writes a `.tflite` flat buffer of builtin ops.

One module per job: `_graph` reads the Keras graph (shared), `_streaming`
plans the `step` signature, `saved_model` and `_warmup` write the SavedModel
and its warmup requests, `tflite` converts for TFLite. Keras's own
`model.export(format=...)` exports are recognised by `keras_lstm._routes`.
"""

from keras_lstm.serving._warmup import WARMUP_FILE
from keras_lstm.serving.saved_model import export_for_serving
from keras_lstm.serving.tflite import export_tflite

__all__ = ["WARMUP_FILE", "export_for_serving", "export_tflite"]

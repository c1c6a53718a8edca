"""`export_tflite`: a `.tflite` model of builtin ops, float or quantized.

The recurrent layers become an unrolled copy (a fixed length), a `WHILE`
loop without tensor lists (a free length), or, with `fused=True`, TFLite's
own `UNIDIRECTIONAL_SEQUENCE_LSTM` op.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import keras
import numpy as np

from keras_lstm import _checks, _internals, _routes
from keras_lstm._atomic import atomic_file
from keras_lstm.serving import _graph

# The converter's op sets for the quantized modes that calibrate activations.
QUANTIZED_OPS = {
    "int8": "TFLITE_BUILTINS_INT8",
    "int16x8": "EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",
}
QUANTIZE_MODES = (None, "dynamic", *QUANTIZED_OPS)


def _representative_inputs(model, quantize, data):
    """The calibration inputs as a list (one array per model input), or `None`."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of {QUANTIZE_MODES}, got {quantize!r}.")
    if quantize not in QUANTIZED_OPS:
        if data is not None:
            raise ValueError(
                f"`representative_data` calibrates int8 or int16x8 activations; with "
                f"quantize={quantize!r} it would be ignored."
            )
        return None
    if data is None:
        raise ValueError(
            f"`quantize={quantize!r}` needs `representative_data`: a few hundred typical "
            "inputs, an array (n, timesteps, features), to calibrate the activations."
        )
    inputs = _graph.model_inputs(model)
    names = [_internals.keras_history(t)[0].name for t in inputs]
    if isinstance(data, dict):
        missing = set(names) - set(data)
        if missing:
            raise ValueError(
                f"`representative_data` has no arrays for the inputs {sorted(missing)}; "
                f"give one per input name: {names}."
            )
        arrays = [np.asarray(data[name], dtype="float32") for name in names]
    elif len(names) == 1:
        arrays = [np.asarray(data, dtype="float32")]
    else:
        raise ValueError(
            f"The model has {len(names)} inputs: `representative_data` must be a dict of "
            f"arrays by input name, {names}."
        )
    for name, array, tensor in zip(names, arrays, inputs, strict=True):
        if array.ndim < 2 or len(array) == 0:
            raise ValueError(
                f"`representative_data` for `{name}` must be a non-empty batch of inputs "
                f"(n, ...), got shape {array.shape}."
            )
        _check_sample_shape(name, array.shape, tuple(tensor.shape))
    return arrays


def _check_sample_shape(name, got, expected):
    """Calibration samples of the model's input shape (a free axis takes any size):
    the converter would otherwise stop deep inside TFLite's ResizeInputTensorStrict."""
    fits = len(got) == len(expected) and all(
        want is None or want == size for want, size in zip(expected[1:], got[1:], strict=True)
    )
    if not fits:
        wanted = ", ".join("any" if d is None else str(d) for d in expected[1:])
        raise ValueError(
            f"`representative_data` for `{name}` has shape {got}, but the model's input "
            f"`{name}` takes (n, {wanted})."
        )


def _calibration(arrays, batch):
    """The converter's `representative_dataset`: up to 300 batches of real inputs."""

    def batches():
        for start in range(0, min(len(arrays[0]), 300 * batch) - batch + 1, batch):
            yield [array[start : start + batch] for array in arrays]

    return batches


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    timesteps: int | None = None,
    batch_size: int | None = 1,
    allow_flex: bool = False,
    quantize: str | None = None,
    representative_data=None,
    fused: bool = False,
) -> str:
    """Write `model` as a TFLite flat buffer that `tf.lite.Interpreter` runs.

    With a known sequence length (`timesteps`, or the model's own fixed
    length) the recurrent layers are unrolled over exactly that many steps,
    which converts to builtin TFLite ops (FULLY_CONNECTED, LOGISTIC, TANH,
    ...), with a fixed or free batch size. With no known length the time
    loop is kept as a builtin `WHILE` op, which accepts any length
    (`interpreter.resize_tensor_input`) and, for `GatedLSTM` with the
    standard cell, any batch size. A layer that runs Keras's step loop (a
    cell option, `keras.layers.RNN(GatedLSTMCell)`) over a free length needs a
    fixed `batch_size`, or TensorFlow (Flex) ops: pass `allow_flex=True`,
    and run the result with the Flex delegate linked in.
    Stateful layers are exported stateless, as in `export_for_serving`. The
    file is written atomically and replaces an existing one.

    Args:
        model: A built functional or Sequential `keras.Model`.
        path: Where to write the `.tflite` file.
        timesteps: Sequence length to unroll for. Default: `None`, the
            model's own fixed length, or a free length if it has none.
        batch_size: Fixed batch size, or `None` for a free one. Default: `1`.
        allow_flex: Allow TensorFlow ops the converter cannot turn into
            builtins (free batch and length). Default: `False`.
        quantize: `None` (float32), `"dynamic"` (int8 weights, float
            activations), `"int8"` (int8 weights and activations) or
            `"int16x8"` (int8 weights, int16 activations). The model's inputs
            and outputs stay float32. `"int16x8"` needs a fixed length.
            Default: `None`.
        fused: Write each `GatedLSTM` that TFLite's fused op can express as
            one `UNIDIRECTIONAL_SEQUENCE_LSTM` op (a fixed batch size, no
            mask, no cell option, no `return_state`; each other layer says
            why in a warning). The op keeps its `h` and `c` in TFLite
            variable tensors between invocations: call
            `interpreter.reset_all_variables()` before each new sequence, or
            use that to stream a sequence chunk by chunk. Not with
            `quantize="int16x8"`. Default: `False`.
        representative_data: For `"int8"` and `"int16x8"`: typical inputs
            that calibrate the activation ranges, an array `(n, timesteps,
            features)` (a few hundred windows), or a dict of such arrays by
            input name for a model with several inputs.

    Returns:
        `path`, as a string.

    Example:

    >>> import os, tempfile, keras, numpy as np, tensorflow as tf
    >>> from keras_lstm import GatedLSTM, export_tflite
    >>> model = keras.Sequential(
    ...     [keras.Input((24, 3), name="hours"), GatedLSTM(8), keras.layers.Dense(1, name="y")]
    ... )
    >>> path = export_tflite(model, os.path.join(tempfile.mkdtemp(), "model.tflite"))
    >>> runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    >>> x = np.random.default_rng(0).standard_normal((1, 24, 3)).astype("float32")
    >>> bool(np.allclose(runner(hours=x)["y"], model(x), atol=1e-4))
    True
    """
    _graph.require_tensorflow_backend("export_tflite")
    model = _graph.servable_model(model)
    representative = _representative_inputs(model, quantize, representative_data)
    fused = _checks.boolean("fused", fused)
    timesteps, batch_size = _checked_lengths(model, timesteps, batch_size)
    path = _checked_path(path)
    fixed_model, fusable = _export_copy(model, batch_size, timesteps, fused)
    flat_buffer = _converted(
        fixed_model, fusable, batch_size, timesteps, quantize, representative, allow_flex
    )
    _write_flat_buffer(path, _with_fused_lstms_unclipped(flat_buffer, len(fusable)))
    return path


def _checked_lengths(model, timesteps, batch_size):
    """`(timesteps, batch_size)` checked, `timesteps` defaulting to the model's fixed length."""
    if timesteps is not None:
        timesteps = _checks.positive_int("timesteps", timesteps)
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    inputs = _graph.model_inputs(model)
    fixed = {t.shape[1] for t in inputs if len(t.shape) == 3} - {None}
    if timesteps is not None and fixed and fixed != {timesteps}:
        raise ValueError(
            f"`timesteps` is {timesteps}, but the model was built for sequences of length "
            f"{sorted(fixed)}."
        )
    if timesteps is None and len(fixed) == 1:
        timesteps = fixed.pop()
    return timesteps, batch_size


def _checked_path(path):
    """`path` as a string, refused if it names a folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"`path` must be a file name, but `{path}` is a folder.")
    return path


def _export_copy(model, batch_size, timesteps, fused):
    """`(fixed_model, fusable)`: the stateless copy to convert and its layers to fuse."""
    fixed_model = _graph.rebuilt(model, stateful=False, batch_size=batch_size, timesteps=timesteps)
    fusable = []
    if fused:
        for layer in _graph.all_layers(fixed_model):
            decision = _fused_decision(layer, batch_size, timesteps)
            if decision is None:
                continue
            if decision.route is _routes.Route.TFLITE_FUSED:
                fusable.append(layer)
            else:
                # stacklevel 3: the warning points at the caller of `export_tflite`.
                warnings.warn(
                    _routes.export_warning(layer.name, decision, "tflite_fused"), stacklevel=3
                )
    if timesteps is not None:  # the other recurrent layers unroll into builtin ops
        _unroll_recurrent_layers(fixed_model, skip=fusable)
    return fixed_model, fusable


def _unroll_recurrent_layers(fixed_model, skip):
    """Set `unroll=True` on every recurrent layer of `fixed_model` not in `skip`."""
    for layer in _graph.all_layers(fixed_model):
        if isinstance(layer, keras.layers.RNN) and layer not in skip:
            layer.unroll = True


def _input_signature(fixed_model, batch_size, timesteps):
    """The `tf.TensorSpec`s of the model's inputs at the export's batch size and length."""
    import tensorflow as tf

    specs = []
    for spec in _graph.input_specs(fixed_model):
        shape = [batch_size, *spec.shape[1:]]
        if len(shape) == 3:
            shape[1] = timesteps
        specs.append(tf.TensorSpec(shape, spec.dtype, name=spec.name))
    return specs


def _converted(fixed_model, fusable, batch_size, timesteps, quantize, representative, allow_flex):
    """The TFLite flat buffer of `fixed_model`, converted through a temporary SavedModel."""
    specs = _input_signature(fixed_model, batch_size, timesteps)
    with tempfile.TemporaryDirectory() as saved_model_dir:
        _write_saved_model(fixed_model, specs, saved_model_dir, fused=bool(fusable))
        converter = _converter(saved_model_dir, quantize, representative, batch_size, allow_flex)
        return _convert(converter, bool(fusable), quantize, allow_flex)


def _write_saved_model(fixed_model, specs, saved_model_dir, fused):
    """Write `fixed_model` as a SavedModel with one `serving_default` endpoint over `specs`."""
    # The SavedModel route freezes the variables into constants; tracing
    # a concrete function directly leaves TFLite resource variables.
    archive = keras.export.ExportArchive()
    archive.track(fixed_model)
    serve = _graph.serve_function(fixed_model, _graph.output_names(fixed_model))

    # TFLite has no kernel for our native op, nor builtins for TensorList
    # ops at a free batch size.
    with _routes.exporting("tflite_fused" if fused else "tflite"):
        archive.add_endpoint("serving_default", serve, input_signature=specs)
        with _graph.quiet_tensorflow_logger():
            archive.write_out(saved_model_dir, verbose=False)


def _converter(saved_model_dir, quantize, representative, batch_size, allow_flex):
    """A `TFLiteConverter` of the SavedModel, set for the quantization and op sets asked for."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        converter.representative_dataset = _calibration(representative, batch_size or 1)
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, QUANTIZED_OPS[quantize])]
    if allow_flex:
        converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        _internals.keep_tensor_list_ops(converter)
    return converter


def _convert(converter, fused, quantize, allow_flex):
    """The converter's flat buffer; a known failure becomes a `ValueError` saying what to pass."""
    try:
        return converter.convert()
    except Exception as error:
        message = _conversion_advice(str(error), fused, quantize, allow_flex)
        if message is None:
            raise
        raise ValueError(message) from None


def _conversion_advice(error, fused, quantize, allow_flex):
    """What to pass instead, for a conversion failure we recognise in `error`, or `None`."""
    if fused and "not yet supported for op: 'UNIDIRECTIONAL_SEQUENCE_LSTM'" in error:
        return (
            f"`quantize={quantize!r}` is not supported by TFLite's converter for the "
            "fused LSTM op: pass fused=False."
        )
    if quantize is not None and "calibration" in error.lower():
        return (
            f"`quantize={quantize!r}` cannot calibrate this model's time loop: "
            "give a fixed `timesteps` (the loop is then unrolled)."
        )
    if allow_flex or "tensor list" not in error.lower():
        return None
    return (
        "With a free sequence length and a free batch size, a layer that runs Keras's "
        "step loop (a cell option, or keras.layers.RNN(GatedLSTMCell)) needs TensorFlow "
        "(Flex) ops: pass batch_size=1, a `timesteps`, or allow_flex=True (the model "
        "then needs the Flex delegate)."
    )


def _with_fused_lstms_unclipped(flat_buffer, fusable_count):
    """`flat_buffer` with its fused LSTMs unclipped; warns if fewer than `fusable_count` fused."""
    if not fusable_count:
        return flat_buffer
    flat_buffer, count = _unclipped_fused_lstms(flat_buffer)
    if count < fusable_count:  # what only tracing shows: a mask
        # stacklevel 3: the warning points at the caller of `export_tflite`.
        warnings.warn(
            f"{fusable_count - count} of the {fusable_count} GatedLSTM layers that "
            "UNIDIRECTIONAL_SEQUENCE_LSTM could express stay a loop in the TFLite "
            "model: they are masked, and the op takes no mask.",
            stacklevel=3,
        )
    return flat_buffer


def _write_flat_buffer(path, flat_buffer):
    """Write `flat_buffer` to `path` atomically, replacing any file there."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flat_buffer)


def _fused_decision(layer, batch_size, timesteps):
    """The route `layer` takes in a TFLite export that fuses what it can (with the
    reason where it is not the fused op), or `None` for layers that are not ours.
    A mask shows only when traced."""
    from keras_lstm.cell import GatedLSTMCell

    if not isinstance(layer, keras.layers.RNN) or not isinstance(layer.cell, GatedLSTMCell):
        return None
    config = _routes.Config.of(layer, shape=(batch_size, timesteps))
    return _routes.resolve(config, _routes.Context(export="tflite_fused"))


def _unclipped_fused_lstms(flat_buffer: bytes) -> tuple[bytes, int]:
    """The model with the converter's cell clip (+-10) taken off every fused LSTM.

    The converter sets `cell_clip=10` on each `UNIDIRECTIONAL_SEQUENCE_LSTM`
    it makes from a Keras LSTM, which would clip a cell state that
    `GatedLSTM` lets grow (long lags, `chrono_init`); 0 means no clip, the
    layer's own maths. Returns the model and how many such ops it holds.
    """
    model = _internals.tflite_model_object(flat_buffer)
    options_type = _internals.tflite_schema().BuiltinOptions.UnidirectionalSequenceLSTMOptions
    count = 0
    for subgraph in model.subgraphs:
        for operator in subgraph.operators or []:
            if operator.builtinOptionsType == options_type:
                operator.builtinOptions.cellClip = 0.0
                count += 1
    return _internals.tflite_model_bytes(model), count

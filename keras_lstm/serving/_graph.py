"""Reading a Keras model's graph for export: its inputs, outputs and layers.

Shared by the SavedModel (`saved_model.py`) and TFLite (`tflite.py`)
exports: the checks a model must pass to be served, the rebuild from its
config (stateless, or with another batch size or length), the signature's
input specs and output names, and the `serve` function both trace.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import keras

from keras_lstm import _internals


@contextlib.contextmanager
def quiet_tensorflow_logger():
    """Hide tf.saved_model.save's "Assets written to <temporary folder>" line."""
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def require_tensorflow_backend(name):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"`{name}` writes TensorFlow graphs and needs the TensorFlow backend; the "
            f"Keras backend is {keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
        )


def servable_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            "`model` is not built, so its input shape is unknown. Build it first: start it "
            "with `keras.Input(shape=(timesteps, features))`, or call it once on a batch."
        )
    inputs = model_inputs(model)
    if inputs is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) is a subclassed model without a graph of "
            "inputs, so its input signature is unknown. Wrap it in a functional model: "
            "`inp = keras.Input((None, features)); keras.Model(inp, model(inp))`."
        )
    for tensor in inputs:
        name = _internals.keras_history(tensor)[0].name
        if len(tensor.shape) < 2:
            raise ValueError(
                f"`model` input `{name}` has shape {tuple(tensor.shape)}; expected at least "
                "(batch, features)."
            )
        if tensor.shape[-1] is None:
            raise ValueError(
                f"`model` input `{name}` has an unknown feature size (last axis of shape "
                f"{tuple(tensor.shape)}). A server needs it fixed: build the model with "
                "`keras.Input(shape=(None, features))`."
            )
    stateful = [layer.name for layer in all_layers(model) if getattr(layer, "stateful", False)]
    if stateful:
        model = stateless_copy(model, stateful)
    return model


def model_inputs(model):
    graph = functional_graph(model)
    return None if graph is None else list(graph.inputs)


def functional_graph(model):
    """The functional graph behind `model`, or None for a subclassed model."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def all_layers(model):
    return _internals.layers_within(model)


def stateless_copy(model, stateful_names):
    """Rebuild `model` from its config with `stateful=False` and copy the weights."""
    how = (
        "A server runs each request from zero state: rebuild the model with stateful=False, "
        "copy the weights with `new.set_weights(model.get_weights())` and export that (the "
        "`step` signature carries state between requests)."
    )
    if functional_graph(model) is None:
        raise ValueError(
            f"`model` has stateful recurrent layers ({', '.join(stateful_names)}) and is a "
            f"subclassed model that cannot be rebuilt automatically. {how}"
        )
    try:
        copy = rebuilt(model, stateful=False, batch_size=None)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(
            f"`model` has stateful recurrent layers ({', '.join(stateful_names)}) and could "
            f"not be rebuilt from its config with stateful=False "
            f"({type(error).__name__}: {first_line}). {how}"
        ) from error
    warnings.warn(
        f"Layers {', '.join(stateful_names)} are stateful; the export serves a copy with "
        "stateful=False and the same weights. Use the `step` signature to carry state.",
        stacklevel=3,
    )
    return copy


def rewrite_config(config, *, stateful=None, unroll=None, batch_size="keep", timesteps=None):
    """A copy of a serialized model with recurrent and input options replaced."""
    if isinstance(config, list):
        return [
            rewrite_config(
                c, stateful=stateful, unroll=unroll, batch_size=batch_size, timesteps=timesteps
            )
            for c in config
        ]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        value = rewrite_config(
            value, stateful=stateful, unroll=unroll, batch_size=batch_size, timesteps=timesteps
        )
        if key == "stateful" and stateful is not None and isinstance(value, bool):
            value = stateful
        elif key == "unroll" and unroll is not None and isinstance(value, bool):
            value = unroll
        elif key in ("batch_shape", "build_input_shape") and _is_shape(value):
            value = list(value)
            if batch_size != "keep":
                value[0] = batch_size
            if timesteps is not None and len(value) == 3:
                value[1] = timesteps
        out[key] = value
    return out


def _is_shape(value):
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, int) for v in value)


def input_specs(model):
    """One `tf.TensorSpec` per model input: batch and time axes left free.

    The other axes, the feature size among them, are fixed; `saved_model._traced`
    makes the signatures check them on every call.
    """
    import tensorflow as tf

    specs = []
    for tensor in model_inputs(model):
        shape = list(tensor.shape)
        shape[0] = None
        if len(shape) == 3:
            shape[1] = None
        name = _internals.keras_history(tensor)[0].name
        specs.append(tf.TensorSpec(shape, tensor.dtype, name=name))
    return specs


def output_names(model):
    names = []
    for tensor in functional_graph(model).outputs:
        operation, node_index, index = _internals.keras_history(tensor)
        count = _internals.node_output_count(operation, node_index)
        names.append(operation.name if count == 1 else f"{operation.name}_{index}")
    seen = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


def rebuilt(model, **rewrite):
    """`model` rebuilt from its config with `rewrite_config(**rewrite)`, same weights."""
    config = rewrite_config(keras.saving.serialize_keras_object(model), **rewrite)
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def serve_function(model, names):
    """The function every export traces: the model's inputs in, `{name: output}` out."""

    def serve(*inputs):
        outputs = model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        return dict(zip(names, keras.tree.flatten(outputs), strict=True))

    return serve

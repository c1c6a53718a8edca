"""Argument checks that fail early, with the argument's name in the message.

Every check here runs in plain Python on static values, before any backend
op is created, so a user sees one line saying what was wrong instead of a
trace from inside a loop body.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
import numpy as np


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """True or False (NumPy's too): `"False"` or `0` would otherwise read as a flag."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")


def rate(name: str, value: Any) -> float:
    """A dropout-like rate: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    return float(value)


def _lookup(kind: str, getter, name: str, value: Any):
    from keras_lstm import _internals

    try:
        function = _internals.saved_lambda(value)
    except _internals.LambdaRefused as error:
        raise ValueError(
            f"`{name}` is a Python lambda saved with the model, and Keras's safe_mode refused "
            "to load it (loading a lambda runs code from the file). If you trust the file, "
            "load it with keras.saving.load_model(path, safe_mode=False); better, use a named "
            "function registered with keras.saving.register_keras_serializable."
        ) from error
    if function is not None:
        return function
    try:
        return getter(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be {_ARTICLE[kind]} {kind} name known to Keras (for example "
            f"{_EXAMPLES[kind]}), a callable or a config dict, got {value!r}."
        ) from error


_ARTICLE = {"activation": "an", "initializer": "an", "regularizer": "a", "constraint": "a"}


_EXAMPLES = {
    "activation": "'tanh', 'sigmoid', 'relu'",
    "initializer": "'glorot_uniform', 'orthogonal', 'zeros'",
    "regularizer": "'l1', 'l2'",
    "constraint": "'max_norm', 'non_neg'",
}


def activation(name: str, value: Any):
    return _lookup("activation", keras.activations.get, name, value)


def initializer(name: str, value: Any):
    return _lookup("initializer", keras.initializers.get, name, value)


def regularizer(name: str, value: Any):
    return _lookup("regularizer", keras.regularizers.get, name, value)


def constraint(name: str, value: Any):
    return _lookup("constraint", keras.constraints.get, name, value)


def sequence_shape(name: str, shape, expected_features: int | None = None) -> None:
    """A batch of sequences is (batch, time, features)."""
    if len(shape) != 3:
        raise ValueError(
            f"`{name}` must be a 3D tensor (batch, timesteps, features), "
            f"got a tensor of shape {tuple(shape)} (rank {len(shape)})."
        )
    features = shape[-1]
    if features is None:
        raise ValueError(
            f"`{name}` must have a known feature size (last axis), got shape {tuple(shape)}."
        )
    if expected_features is not None and features != expected_features:
        raise ValueError(
            f"`{name}` has {features} features (last axis of shape {tuple(shape)}), "
            f"but the layer was built for {expected_features}."
        )


def float_inputs(name: str, tensor, dtype):
    """`tensor` in floating point: integer and boolean inputs cast to `dtype`.

    `keras.layers.LSTM` takes them too (its matmuls promote them to the
    kernel's float type), so a drop-in does the same; other dtypes (strings)
    are refused with the way out.
    """
    kind = keras.backend.standardize_dtype(tensor.dtype)
    if "float" in kind:
        return tensor
    if kind == "bool" or "int" in kind:
        return keras.ops.cast(tensor, dtype)
    raise TypeError(
        f"`{name}` must be a floating-point, integer or boolean tensor, got dtype {kind}. "
        "Turn text into numbers first (for example keras.layers.StringLookup, then a "
        "keras.layers.Embedding)."
    )


def step_states(name: str, states, sizes, batch) -> None:
    """A cell step's states: one (batch, size) tensor per entry of `state_size`."""
    if not isinstance(states, (list, tuple)) or len(states) != len(sizes):
        got = len(states) if isinstance(states, (list, tuple)) else "a single tensor"
        raise ValueError(
            f"`{name}` must be a list of {len(sizes)} tensors [h, c] of shapes "
            + " and ".join(f"(batch, {size})" for size in sizes)
            + f", got {got}."
        )
    for label, state, size in zip(("h", "c"), states, sizes, strict=True):
        shape = tuple(state.shape)
        if (
            len(shape) != 2
            or shape[1] not in (None, size)
            or None not in (batch, shape[0])
            and shape[0] != batch
        ):
            raise ValueError(f"`{name}` {label} must have shape ({batch}, {size}), got {shape}.")


# TensorFlow Serving reads a version as a signed 64-bit integer.
MAX_INT64 = 2**63 - 1


def positive_int64(name: str, value: Any) -> int:
    """A positive integer that fits in int64 (a model version, as servers read it)."""
    value = positive_int(name, value)
    if value > MAX_INT64:
        raise ValueError(
            f"`{name}` must be at most {MAX_INT64} (it is read as a 64-bit integer), got {value}."
        )
    return value

"""Argument checks that fail early, with the argument's name in the message.

Every check here runs in plain Python on static values, before any backend
op is created, so a user sees one line saying what was wrong instead of a
trace from inside a loop body.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def rate(name: str, value: Any) -> float:
    """A dropout-like rate: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    return float(value)


def _lookup(kind: str, getter, name: str, value: Any):
    try:
        return getter(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be a {kind} name known to Keras (for example "
            f"{_EXAMPLES[kind]}), a callable or a config dict, got {value!r}."
        ) from error


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

"""Padding variable-length sequences to a few fixed lengths, so XLA compiles a few times."""

from __future__ import annotations

import numpy as np


def pad_to_bucket(
    sequences, bucket: int = 32, value: float = 0.0, dtype="float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Pads a list of sequences to the next multiple of `bucket` steps, with a mask.

    A function compiled with `jit_compile=True` is compiled again for every
    new input shape. Padding each batch to a multiple of `bucket` time steps
    bounds the number of distinct shapes (and so of compilations) to
    `max_length / bucket`, and the returned mask makes the padded steps carry
    the state through unchanged, so the results equal those of the unpadded
    sequences. Pass the mask to the layer: `layer(batch, mask=mask)`.

    Args:
        sequences: A non-empty list of arrays, each `(length_i, features)`,
            all with the same `features`.
        bucket: Positive integer; the padded length is the smallest multiple
            of it that holds the longest sequence. Default: `32`.
        value: The value of the padded steps. Default: `0.0`.
        dtype: The dtype of the returned batch. Default: `"float32"`.

    Returns:
        `(batch, mask)`: `batch` of shape `(len(sequences), padded_length,
        features)` and a boolean `mask` of shape `(len(sequences),
        padded_length)`, `True` on real steps.

    Example:

    >>> import numpy as np
    >>> from keras_lstm import GatedLSTM, pad_to_bucket
    >>> batch, mask = pad_to_bucket([np.ones((5, 3)), np.ones((9, 3))], bucket=8)
    >>> batch.shape, mask.sum(axis=1).tolist()
    ((2, 16, 3), [5, 9])
    >>> GatedLSTM(4)(batch, mask=mask).shape
    TensorShape([2, 4])
    """
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise ValueError(f"`bucket` must be a positive integer, got {bucket!r}.")
    if isinstance(sequences, np.ndarray) or not isinstance(sequences, (list, tuple)):
        raise TypeError(
            "`sequences` must be a list of arrays of shape (length, features), "
            f"got {type(sequences).__name__}."
        )
    if not sequences:
        raise ValueError("`sequences` must not be empty.")
    arrays = [np.asarray(s) for s in sequences]
    for k, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(
                f"`sequences[{k}]` must have shape (length, features), got {array.shape}."
            )
        if array.shape[1] != arrays[0].shape[1]:
            raise ValueError(
                f"`sequences[{k}]` has {array.shape[1]} features but `sequences[0]` has "
                f"{arrays[0].shape[1]}; all must have the same number."
            )
    longest = max(len(a) for a in arrays)
    padded_length = max(1, -(-longest // bucket)) * bucket
    batch = np.full((len(arrays), padded_length, arrays[0].shape[1]), value, dtype=dtype)
    mask = np.zeros((len(arrays), padded_length), dtype=bool)
    for k, array in enumerate(arrays):
        batch[k, : len(array)] = array
        mask[k, : len(array)] = True
    return batch, mask

"""Readers for the data files that `vega_datasets` and `statsmodels` ship."""

from __future__ import annotations

import numpy as np


def _require(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(
            f"This dataset is read from the `{package}` package, which is not installed. "
            f"Install it with `pip install {package}` (it ships the data; nothing is downloaded)."
        ) from error


def seattle_hourly_temperatures() -> tuple[np.ndarray, np.ndarray]:
    """Hourly Seattle temperatures of 2010 (8,759 hours), in degrees Fahrenheit.

    Returns:
        `(times, temps)`: `datetime64[h]` timestamps and float32 temperatures,
        in time order, as shipped by `vega_datasets` (read from its local
        file, never downloaded).

    Example:

    >>> from keras_lstm.datasets import seattle_hourly_temperatures
    >>> times, temps = seattle_hourly_temperatures()
    >>> len(temps)
    8759
    """
    vega = _require("vega_datasets", "vega_datasets")
    frame = vega.local_data.seattle_temps()
    times = frame["date"].to_numpy().astype("datetime64[h]")
    temps = frame["temp"].to_numpy(dtype=np.float32)
    return times, temps

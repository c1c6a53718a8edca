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


WEATHER_FEATURES = ("precipitation", "temp_max", "temp_min", "wind")
WEATHER_CLASSES = ("drizzle", "fog", "rain", "snow", "sun")


def seattle_daily_weather() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Daily Seattle weather, 2012 to 2015 (1,461 days), with the day's category.

    Returns:
        `(days, measurements, labels)`: `datetime64[D]` dates; float32
        measurements of shape `(days, 4)`, columns `WEATHER_FEATURES`
        (precipitation in mm, daily maximum and minimum temperature in °C,
        mean wind speed in m/s); int64 labels indexing `WEATHER_CLASSES`
        (`drizzle`, `fog`, `rain`, `snow`, `sun`). As shipped by
        `vega_datasets`, read from its local file.

    Example:

    >>> from keras_lstm.datasets import seattle_daily_weather, WEATHER_CLASSES
    >>> days, measurements, labels = seattle_daily_weather()
    >>> measurements.shape, WEATHER_CLASSES[labels[1]]
    ((1461, 4), 'rain')
    """
    vega = _require("vega_datasets", "vega_datasets")
    frame = vega.local_data.seattle_weather()
    days = frame["date"].to_numpy().astype("datetime64[D]")
    measurements = frame[list(WEATHER_FEATURES)].to_numpy(dtype=np.float32)
    labels = np.array([WEATHER_CLASSES.index(w) for w in frame["weather"]], dtype=np.int64)
    return days, measurements, labels


def mauna_loa_co2() -> tuple[np.ndarray, np.ndarray]:
    """Weekly atmospheric CO2 at Mauna Loa, March 1958 to December 2001 (2,284 weeks).

    Returns:
        `(weeks, co2)`: `datetime64[D]` dates (Saturdays) and float32 CO2
        concentrations in parts per million, `NaN` for the 59 weeks with no
        measurement. As shipped by `statsmodels` (`statsmodels.datasets.co2`),
        read from its local file.

    Example:

    >>> import numpy as np
    >>> from keras_lstm.datasets import mauna_loa_co2
    >>> weeks, co2 = mauna_loa_co2()
    >>> len(co2), int(np.isnan(co2).sum())
    (2284, 59)
    """
    datasets = _require("statsmodels.datasets", "statsmodels")
    frame = datasets.co2.load_pandas().data
    weeks = frame.index.to_numpy().astype("datetime64[D]")
    return weeks, frame["co2"].to_numpy(dtype=np.float32)


def yearly_sunspots() -> tuple[np.ndarray, np.ndarray]:
    """Yearly mean sunspot numbers, 1700 to 2008 (309 years).

    Returns:
        `(years, sunspots)`: `datetime64[Y]` years and float32 sunspot
        numbers. As shipped by `statsmodels` (`statsmodels.datasets.sunspots`),
        read from its local file.

    Example:

    >>> from keras_lstm.datasets import yearly_sunspots
    >>> years, sunspots = yearly_sunspots()
    >>> str(years[0]), float(sunspots[0])
    ('1700', 5.0)
    """
    datasets = _require("statsmodels.datasets", "statsmodels")
    frame = datasets.sunspots.load_pandas().data
    years = frame["YEAR"].to_numpy().astype(np.int64).astype(str).astype("datetime64[Y]")
    return years, frame["SUNACTIVITY"].to_numpy(dtype=np.float32)

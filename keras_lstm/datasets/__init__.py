"""Real series that ship inside installed packages, read with no network.

Importing this package registers four tensorflow-datasets builders, so
`tfds.load("seattle_temps", data_dir=...)` works as well as this package's
`load()`:

- `seattle_temps`: hourly Seattle temperatures, 2010 (`vega_datasets`).
- `seattle_weather`: daily Seattle weather and its category, 2012 to 2015
  (`vega_datasets`).
- `mauna_loa_co2`: weekly Mauna Loa CO2, 1958 to 2001 (`statsmodels`).
- `sunspots`: yearly sunspot numbers, 1700 to 2008 (`statsmodels`).

The plain readers (`seattle_hourly_temperatures()`, ...) return NumPy arrays.
"""

from keras_lstm.datasets.builders import (
    NAMES,
    SPLIT_FRACTIONS,
    MaunaLoaCo2,
    SeattleTemps,
    SeattleWeather,
    SeriesConfig,
    Sunspots,
    WeatherConfig,
    builder,
    load,
)
from keras_lstm.datasets.sources import (
    WEATHER_CLASSES,
    WEATHER_FEATURES,
    mauna_loa_co2,
    seattle_daily_weather,
    seattle_hourly_temperatures,
    yearly_sunspots,
)

__all__ = [
    "NAMES",
    "SPLIT_FRACTIONS",
    "WEATHER_CLASSES",
    "WEATHER_FEATURES",
    "MaunaLoaCo2",
    "SeattleTemps",
    "SeattleWeather",
    "SeriesConfig",
    "Sunspots",
    "WeatherConfig",
    "builder",
    "load",
    "mauna_loa_co2",
    "seattle_daily_weather",
    "seattle_hourly_temperatures",
    "yearly_sunspots",
]

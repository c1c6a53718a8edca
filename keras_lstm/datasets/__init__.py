"""Real series that ship inside installed packages, read with no network."""

from keras_lstm.datasets.sources import seattle_hourly_temperatures

__all__ = ["seattle_hourly_temperatures"]

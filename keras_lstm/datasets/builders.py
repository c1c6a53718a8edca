"""tensorflow-datasets builders for the series in `sources`, cut into windows.

Each builder reads a file that an installed package ships (`vega_datasets`,
`statsmodels`) and writes windowed examples into a `data_dir` you choose.
Nothing is downloaded: the builders never call the download manager, and
`builder()` / `load()` also switch off tfds's look-ups of prepared copies on
Google Cloud Storage.

Splits are by time: the first 70 % of the series is `train`, the next 15 %
`validation`, the last 15 % `test`. A window's inputs and its targets lie in
one part, so no value is seen by two splits, and the scale statistics in
`info.metadata` come from the training part alone.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_lstm.datasets import sources

SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}


def _time_segments(length: int) -> dict[str, range]:
    """The positions of each split: consecutive, disjoint, in time order."""
    train_end = int(length * SPLIT_FRACTIONS["train"])
    validation_end = int(length * (SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"]))
    return {
        "train": range(0, train_end),
        "validation": range(train_end, validation_end),
        "test": range(validation_end, length),
    }


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return int(value)


def _check_fits(dataset: str, segments: dict[str, range], span: int, what: str) -> None:
    shortest = min(segments.values(), key=len)
    if span > len(shortest):
        raise ValueError(
            f"{what} spans {span} steps, but the shortest split of `{dataset}` has only "
            f"{len(shortest)}; choose a smaller `window`."
        )


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """Dataset info that is never looked up on Google Cloud Storage.

    tfds asks its GCS bucket for precomputed info whenever a builder starts on
    an empty `data_dir`; these datasets are built only from local files.
    """

    def initialize_from_bucket(self) -> None:
        return None


@dataclasses.dataclass(eq=False)
class SeriesConfig(tfds.core.BuilderConfig):
    """How a univariate series is cut into examples.

    Args:
        name: The config's name, part of the prepared folder's path.
        window: Positive integer, the number of past steps an example holds
            as `history`. Default: `24`.
        horizon: Positive integer, the number of following steps it holds as
            `target`. Default: `1`.
        description: Optional text shown in the dataset's info. Default: `None`.

    Example:

    >>> from keras_lstm.datasets import SeriesConfig
    >>> config = SeriesConfig(name="two_days_to_six_hours", window=48, horizon=6)
    >>> config.window, config.horizon
    (48, 6)
    """

    window: int = 24
    horizon: int = 1

    def __post_init__(self):
        self.window = _check_count("window", self.window, 1)
        self.horizon = _check_count("horizon", self.horizon, 1)


@dataclasses.dataclass(eq=False)
class WeatherConfig(tfds.core.BuilderConfig):
    """How the daily weather table is cut into labelled windows.

    Args:
        name: The config's name, part of the prepared folder's path.
        window: Positive integer, the number of days of measurements an
            example holds. Default: `7`.
        lead: Non-negative integer: the label is the weather category of the
            day `lead` days after the window's last day; `0` labels the last
            day itself (its measurements are in the window). Default: `0`.
        description: Optional text shown in the dataset's info. Default: `None`.

    Example:

    >>> from keras_lstm.datasets import WeatherConfig
    >>> WeatherConfig(name="tomorrow", window=14, lead=1).lead
    1
    """

    window: int = 7
    lead: int = 0

    def __post_init__(self):
        self.window = _check_count("window", self.window, 1)
        self.lead = _check_count("lead", self.lead, 0)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose data ships with an installed package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    # tfds prints "Downloading and preparing ..." to stdout; nothing is
    # downloaded here, so say where the data went in the log instead.
    def _log_download_bytes(self) -> None:
        logging.info("Preparing %s in %s", self.info.full_name, self.data_path)

    def _log_download_done(self) -> None:
        logging.info("Prepared %s in %s", self.info.full_name, self.data_path)


class _SeriesBuilder(_LocalBuilder, skip_registration=True):
    """Windows of one univariate series; subclasses say where the series is."""

    _DESCRIPTION = ""
    _UNITS = ""
    _STEP = ""
    _HOMEPAGE = ""
    _CITATION = ""

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        window, horizon = self.builder_config.window, self.builder_config.horizon
        return _LocalDatasetInfo(
            builder=self,
            description=(
                f"{self._DESCRIPTION} Each example holds {window} consecutive {self._STEP}s "
                f"(`history`) and the {horizon} that follow (`target`), in {self._UNITS}. "
                "Splits by time: first 70 % train, next 15 % validation, last 15 % test; a "
                "window never crosses a split. `info.metadata` holds the mean and standard "
                "deviation of the training part."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "history": tfds.features.Tensor(
                        shape=(window,),
                        dtype=np.float32,
                        doc=f"The {window} {self._STEP}s before the target, in {self._UNITS}.",
                    ),
                    "target": tfds.features.Tensor(
                        shape=(horizon,),
                        dtype=np.float32,
                        doc=f"The {horizon} {self._STEP}(s) after the history, in {self._UNITS}.",
                    ),
                    "time": tfds.features.Text(
                        doc=f"ISO 8601 time of the first target {self._STEP}."
                    ),
                }
            ),
            supervised_keys=("history", "target"),
            homepage=self._HOMEPAGE,
            citation=self._CITATION,
            metadata=tfds.core.MetadataDict(),
            # Examples are written and read in time order, which forecast plots need.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with an installed package
        times, values = self._read()
        window, horizon = self.builder_config.window, self.builder_config.horizon
        segments = _time_segments(len(values))
        _check_fits(self.name, segments, window + horizon, "`window` + `horizon`")
        train = values[segments["train"].start : segments["train"].stop]
        self.info.metadata.update(
            train_mean=float(np.nanmean(train)),
            train_std=float(np.nanstd(train)),
            units=self._UNITS,
            step=self._STEP,
            split_start_times={name: str(times[s.start]) for name, s in segments.items()},
        )
        return {
            name: self._generate_examples(times, values, segment)
            for name, segment in segments.items()
        }

    def _generate_examples(self, times, values, segment: range):
        window, horizon = self.builder_config.window, self.builder_config.horizon
        for start in range(segment.start, segment.stop - window - horizon + 1):
            history = values[start : start + window]
            target = values[start + window : start + window + horizon]
            # A window with a missing value is left out, never filled in.
            if np.isnan(history).any() or np.isnan(target).any():
                continue
            yield start, {"history": history, "target": target, "time": str(times[start + window])}


class SeattleTemps(_SeriesBuilder):
    """Hourly Seattle temperatures of 2010 in windows, read from `vega_datasets`.

    Configs: `next_hour` (24 hours of history, 1 hour of target; the default)
    and `next_day` (48 hours of history, the next 24 hours as target). Pass a
    `SeriesConfig` for other windows. Features: `history` (window,) and
    `target` (horizon,) float32 in °F, `time` the first target hour. Splits:
    train 6,131 hours (1 Jan to 13 Sep), validation 1,314, test 1,314 hours.

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import load
    >>> ds = load("seattle_temps", "validation", data_dir=tempfile.mkdtemp())
    >>> example = next(iter(ds))
    >>> example["history"].shape, example["target"].shape
    (TensorShape([24]), TensorShape([1]))
    """

    BUILDER_CONFIGS = [
        SeriesConfig(
            name="next_hour", window=24, horizon=1, description="24 hours -> the next hour."
        ),
        SeriesConfig(
            name="next_day", window=48, horizon=24, description="48 hours -> the next 24 hours."
        ),
    ]
    _DESCRIPTION = "Hourly temperatures in Seattle, 2010, from the `vega_datasets` package."
    _UNITS = "degrees Fahrenheit"
    _STEP = "hour"
    _HOMEPAGE = "https://github.com/vega/vega-datasets"
    _CITATION = "NOAA, hourly temperatures, Seattle 2010; distributed with vega-datasets."

    def _read(self):
        return sources.seattle_hourly_temperatures()


class MaunaLoaCo2(_SeriesBuilder):
    """Weekly Mauna Loa CO2 (ppm), 1958 to 2001, in windows, read from `statsmodels`.

    Config `default`: 52 weeks of history, the next week as target. Windows
    that touch one of the 59 missing weeks are left out (not interpolated,
    which would borrow from the future).

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import load
    >>> ds = load("mauna_loa_co2", "test", data_dir=tempfile.mkdtemp())
    >>> next(iter(ds))["history"].shape
    TensorShape([52])
    """

    BUILDER_CONFIGS = [
        SeriesConfig(name="default", window=52, horizon=1, description="52 weeks -> the next week.")
    ]
    _DESCRIPTION = (
        "Weekly atmospheric CO2 concentration at Mauna Loa, March 1958 to December 2001, "
        "from the `statsmodels` package."
    )
    _UNITS = "parts per million"
    _STEP = "week"
    _HOMEPAGE = "https://www.statsmodels.org/stable/datasets/generated/co2.html"
    _CITATION = (
        "Keeling, C.D. and T.P. Whorf, Scripps Institution of Oceanography: atmospheric CO2 "
        "records from sites in the SIO air sampling network."
    )

    def _read(self):
        return sources.mauna_loa_co2()


class Sunspots(_SeriesBuilder):
    """Yearly sunspot numbers, 1700 to 2008, in windows, read from `statsmodels`.

    Config `default`: 22 years of history (two solar cycles), the next year
    as target.

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import load
    >>> ds = load("sunspots", "train", data_dir=tempfile.mkdtemp())
    >>> next(iter(ds))["time"].numpy()
    b'1722'
    """

    BUILDER_CONFIGS = [
        SeriesConfig(name="default", window=22, horizon=1, description="22 years -> the next year.")
    ]
    _DESCRIPTION = "Yearly mean sunspot numbers, 1700 to 2008, from the `statsmodels` package."
    _UNITS = "sunspot number"
    _STEP = "year"
    _HOMEPAGE = "https://www.statsmodels.org/stable/datasets/generated/sunspots.html"
    _CITATION = "SIDC, Royal Observatory of Belgium: yearly mean total sunspot number."

    def _read(self):
        return sources.yearly_sunspots()


class SeattleWeather(_LocalBuilder):
    """Daily Seattle weather 2012 to 2015 in labelled windows, read from `vega_datasets`.

    Configs: `today` (7 days of measurements; the label is the category of
    the last day; the default) and `tomorrow` (the label is the next day's).
    Features: `measurements` (window, 4) float32, columns precipitation (mm),
    temp_max and temp_min (°C), wind (m/s); `label` one of drizzle, fog,
    rain, snow, sun; `date` the labelled day.

    The labels of this table change meaning over time: from 2013 on, most wet
    days are labelled `fog` rather than `rain`. A split by time shows it.

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import load
    >>> ds = load("seattle_weather", "train", data_dir=tempfile.mkdtemp(), as_supervised=True)
    >>> measurements, label = next(iter(ds))
    >>> measurements.shape
    TensorShape([7, 4])
    """

    BUILDER_CONFIGS = [
        WeatherConfig(
            name="today", window=7, lead=0, description="7 days -> the last day's category."
        ),
        WeatherConfig(
            name="tomorrow", window=7, lead=1, description="7 days -> the next day's category."
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        window, lead = self.builder_config.window, self.builder_config.lead
        day = "the window's last day" if lead == 0 else f"the day {lead} day(s) after the window"
        return _LocalDatasetInfo(
            builder=self,
            description=(
                "Daily weather in Seattle, 2012 to 2015, from the `vega_datasets` package. "
                f"Each example holds {window} days of measurements and the weather category "
                f"of {day}. Splits by time: first 70 % train, next 15 % validation, last 15 % "
                "test; a window and its labelled day never cross a split. `info.metadata` "
                "holds the training part's per-column mean and standard deviation."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "measurements": tfds.features.Tensor(
                        shape=(window, len(sources.WEATHER_FEATURES)),
                        dtype=np.float32,
                        doc="Per day: precipitation (mm), temp_max (°C), temp_min (°C), "
                        "wind (m/s).",
                    ),
                    "label": tfds.features.ClassLabel(
                        names=list(sources.WEATHER_CLASSES), doc=f"The category of {day}."
                    ),
                    "date": tfds.features.Text(doc="ISO 8601 date of the labelled day."),
                }
            ),
            supervised_keys=("measurements", "label"),
            homepage="https://github.com/vega/vega-datasets",
            citation="NOAA daily weather, Seattle 2012-2015; distributed with vega-datasets.",
            metadata=tfds.core.MetadataDict(),
            # Examples are written and read in time order, which forecast plots need.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        days, measurements, labels = sources.seattle_daily_weather()
        window, lead = self.builder_config.window, self.builder_config.lead
        segments = _time_segments(len(days))
        _check_fits(self.name, segments, window + lead, "`window` + `lead`")
        train = measurements[segments["train"].start : segments["train"].stop]
        self.info.metadata.update(
            feature_names=list(sources.WEATHER_FEATURES),
            train_mean=train.mean(axis=0).tolist(),
            train_std=train.std(axis=0).tolist(),
            split_start_times={name: str(days[s.start]) for name, s in segments.items()},
        )
        return {
            name: self._generate_examples(days, measurements, labels, segment)
            for name, segment in segments.items()
        }

    def _generate_examples(self, days, measurements, labels, segment: range):
        window, lead = self.builder_config.window, self.builder_config.lead
        for start in range(segment.start, segment.stop - window - lead + 1):
            labelled = start + window - 1 + lead
            yield (
                start,
                {
                    "measurements": measurements[start : start + window],
                    "label": int(labels[labelled]),
                    "date": str(days[labelled]),
                },
            )


_BUILDERS = {
    "seattle_temps": SeattleTemps,
    "seattle_weather": SeattleWeather,
    "mauna_loa_co2": MaunaLoaCo2,
    "sunspots": Sunspots,
}
NAMES = tuple(_BUILDERS)


def builder(
    name: str,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    data_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Prepare one of this package's datasets (once) and return its tfds builder.

    Preparing reads the data file an installed package ships and writes
    TFRecords under `data_dir`; nothing is downloaded and Google Cloud
    Storage is never asked for a prepared copy. A prepared dataset is reused.

    Args:
        name: One of `"seattle_temps"`, `"seattle_weather"`,
            `"mauna_loa_co2"`, `"sunspots"`.
        config: A config name (for example `"next_day"`), a `SeriesConfig` /
            `WeatherConfig`, or `None` for the dataset's first config.
            Default: `None`.
        data_dir: Folder the prepared data goes to. Default: `None`, tfds's
            own (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    Returns:
        The prepared `tfds.core.DatasetBuilder`; `builder.info.metadata` holds
        the training part's scale statistics.

    Raises:
        ImportError: When the package that ships the data is missing; the
            message says what to install.

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import builder
    >>> temps = builder("seattle_temps", config="next_day", data_dir=tempfile.mkdtemp())
    >>> temps.info.splits["test"].num_examples
    1243
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"`name` must be one of {', '.join(NAMES)}, got {name!r}.")
    if config is not None and not isinstance(config, (str, tfds.core.BuilderConfig)):
        raise TypeError(
            "`config` must be a config name, a SeriesConfig / WeatherConfig or None, "
            f"got {type(config).__name__}."
        )
    if isinstance(config, str):
        known = [c.name for c in _BUILDERS[name].BUILDER_CONFIGS]
        if config not in known:
            raise ValueError(
                f"`config` of `{name}` must be one of {', '.join(known)} or a "
                f"{'WeatherConfig' if name == 'seattle_weather' else 'SeriesConfig'}, "
                f"got {config!r}."
            )
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"`data_dir` must be a path or None, got {type(data_dir).__name__}.")
    kwargs = {} if config is None else {"config": config}
    dataset = tfds.builder(name, data_dir=data_dir, try_gcs=False, **kwargs)
    dataset.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return dataset


def load(
    name: str,
    split: str = "train",
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    as_supervised: bool = False,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Windows of one split of a dataset, as a `tf.data.Dataset` in time order.

    The same as `tfds.load(name, split=..., data_dir=...)` once
    `keras_lstm.datasets` is imported, with the network kept out of it.

    Args:
        name: One of `"seattle_temps"`, `"seattle_weather"`,
            `"mauna_loa_co2"`, `"sunspots"`.
        split: `"train"`, `"validation"` or `"test"` (tfds slicing such as
            `"train[:10%]"` works too). Default: `"train"`.
        config: As in `builder`. Default: `None`.
        data_dir: As in `builder`. Default: `None`.
        as_supervised: Yield `(inputs, target)` pairs instead of feature
            dicts. Default: `False`.
        batch_size: Batch the examples (the last batch may be smaller).
            Default: `None`, unbatched.

    Example:

    >>> import tempfile
    >>> from keras_lstm.datasets import load
    >>> ds = load("sunspots", "test", data_dir=tempfile.mkdtemp(), as_supervised=True,
    ...           batch_size=8)
    >>> history, target = next(iter(ds))
    >>> history.shape, target.shape
    (TensorShape([8, 22]), TensorShape([8, 1]))
    """
    if not isinstance(split, str):
        raise TypeError(f"`split` must be a string such as 'train', got {type(split).__name__}.")
    if batch_size is not None:
        batch_size = _check_count("batch_size", batch_size, 1)
    dataset = builder(name, config=config, data_dir=data_dir)
    return dataset.as_dataset(
        split=split, as_supervised=bool(as_supervised), batch_size=batch_size, shuffle_files=False
    )

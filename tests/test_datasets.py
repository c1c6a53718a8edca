"""The tfds builders: no network, splits by time, windows equal to the source files.

The reference for every value is the data file read directly with pandas
(through `vega_datasets` / `statsmodels`), not the package's own readers.
"""

import doctest
import socket
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from keras_lstm import datasets
from keras_lstm.datasets import SeriesConfig, WeatherConfig, builders, sources

tfds.disable_progress_bar()


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


@pytest.fixture(scope="module")
def offline():
    """No sockets, and tfds's Google Cloud Storage look-ups switched on but failing loudly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        patch.setattr(socket, "getaddrinfo", _no_network)
        patch.setattr(gcs_utils, "_is_gcs_disabled", False)
        for name in ("gcs_listdir", "gcs_dataset_info_files", "is_dataset_on_gcs", "exists"):
            patch.setattr(gcs_utils, name, _no_network)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, offline):
    path = tmp_path_factory.mktemp("tfds")
    for name in datasets.NAMES:
        datasets.builder(name, data_dir=path)
    datasets.builder("seattle_temps", config="next_day", data_dir=path)
    datasets.builder("seattle_weather", config="tomorrow", data_dir=path)
    return path


def _read(name, split, data_dir, config=None):
    return list(tfds.as_numpy(datasets.load(name, split, config=config, data_dir=data_dir)))


def _segments(length):
    """The split boundaries, re-derived from the documented 70 / 15 / 15 fractions."""
    a, b = int(length * 0.7), int(length * 0.85)
    return {"train": (0, a), "validation": (a, b), "test": (b, length)}


def test_every_builder_prepares_into_the_given_data_dir_without_the_network(data_dir):
    prepared = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.glob("*/*/1.0.0"))
    assert prepared == [
        "mauna_loa_co2/default/1.0.0",
        "seattle_temps/next_day/1.0.0",
        "seattle_temps/next_hour/1.0.0",
        "seattle_weather/today/1.0.0",
        "seattle_weather/tomorrow/1.0.0",
        "sunspots/default/1.0.0",
    ]
    for folder in data_dir.glob("*/*/1.0.0"):
        assert (folder / "dataset_info.json").exists()
        assert list(folder.glob("*-train.tfrecord-*"))


def test_tfds_load_finds_the_registered_builders_offline(data_dir):
    ours = _read("sunspots", "test", data_dir)
    theirs = list(
        tfds.as_numpy(tfds.load("sunspots", split="test", data_dir=data_dir, try_gcs=False))
    )
    assert len(ours) == len(theirs) == 25
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a["history"], b["history"])
        assert a["time"] == b["time"]


def test_hourly_windows_equal_the_source_file_and_stay_inside_their_split(data_dir):
    import vega_datasets

    frame = vega_datasets.local_data.seattle_temps()
    position = {t: i for i, t in enumerate(frame["date"].dt.strftime("%Y-%m-%dT%H"))}
    temps = frame["temp"].to_numpy()
    for config, window, horizon in [("next_hour", 24, 1), ("next_day", 48, 24)]:
        for split, (lo, hi) in _segments(len(frame)).items():
            examples = _read("seattle_temps", split, data_dir, config)
            assert len(examples) == (hi - lo) - window - horizon + 1
            starts = np.array([position[e["time"].decode()] for e in examples])
            # In time order, one example per hour, inputs and targets inside the split.
            np.testing.assert_array_equal(starts, np.arange(lo + window, hi - horizon + 1))
            every = max(1, len(examples) // 50)
            for example, start in zip(examples[::every], starts[::every], strict=True):
                np.testing.assert_allclose(
                    example["history"], temps[start - window : start], rtol=1e-6
                )
                np.testing.assert_allclose(
                    example["target"], temps[start : start + horizon], rtol=1e-6
                )


def test_scale_statistics_come_from_the_training_part_only(data_dir):
    import vega_datasets

    temps = vega_datasets.local_data.seattle_temps()["temp"]
    train = temps[: int(len(temps) * 0.7)]
    metadata = datasets.builder("seattle_temps", data_dir=data_dir).info.metadata
    assert metadata["train_mean"] == pytest.approx(train.mean(), rel=1e-5)
    assert metadata["train_std"] == pytest.approx(train.std(ddof=0), rel=1e-5)
    assert metadata["train_mean"] != pytest.approx(temps.mean(), rel=1e-3)
    assert metadata["split_start_times"]["validation"] == "2010-09-13T12"


def test_co2_windows_with_a_missing_week_are_left_out(data_dir):
    import statsmodels.datasets

    co2 = statsmodels.datasets.co2.load_pandas().data["co2"]
    span = 52 + 1
    for split, (lo, hi) in _segments(len(co2)).items():
        part = co2.iloc[lo:hi]
        complete = part.notna().rolling(span).sum().to_numpy()[span - 1 :] == span
        examples = _read("mauna_loa_co2", split, data_dir)
        assert len(examples) == int(complete.sum())
        assert not any(
            np.isnan(e["history"]).any() or np.isnan(e["target"]).any() for e in examples
        )
        expected_times = part.index[span - 1 :][complete]
        first_targets = [e["time"].decode() for e in examples]
        assert first_targets == [str(t.date()) for t in expected_times]


def test_weather_label_is_the_category_of_the_labelled_day(data_dir):
    import vega_datasets

    frame = vega_datasets.local_data.seattle_weather()
    row = {str(d.date()): i for i, d in enumerate(frame["date"])}
    columns = ["precipitation", "temp_max", "temp_min", "wind"]
    for config, lead in [("today", 0), ("tomorrow", 1)]:
        for split, (lo, hi) in _segments(len(frame)).items():
            examples = _read("seattle_weather", split, data_dir, config)
            assert len(examples) == (hi - lo) - 7 - lead + 1
            for example in examples[::23]:
                day = row[example["date"].decode()]
                assert lo + 6 + lead <= day < hi
                assert sources.WEATHER_CLASSES[example["label"]] == frame["weather"][day]
                last_input = day - lead
                np.testing.assert_allclose(
                    example["measurements"],
                    frame[columns].to_numpy()[last_input - 6 : last_input + 1],
                    rtol=1e-6,
                )


def test_supervised_batches_and_custom_windows(data_dir):
    history, target = next(
        iter(datasets.load("sunspots", "test", data_dir=data_dir, as_supervised=True, batch_size=8))
    )
    assert history.shape == (8, 22) and target.shape == (8, 1)
    custom = SeriesConfig(name="six_to_three", window=6, horizon=3)
    example = _read("seattle_temps", "test", data_dir, custom)[0]
    assert example["history"].shape == (6,) and example["target"].shape == (3,)
    measurements, label = next(
        iter(datasets.load("seattle_weather", "validation", data_dir=data_dir, as_supervised=True))
    )
    assert measurements.shape == (7, 4) and label.dtype.name == "int64"


def test_docstring_examples_run(tmp_path, monkeypatch, offline):
    counter = iter(range(1000))
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path / f"data{next(counter)}"))
    for module in (sources, builders):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: SeriesConfig(name="x", window=0),
            ValueError,
            "`window` must be a positive integer",
        ),
        (lambda: SeriesConfig(name="x", horizon="2"), ValueError, "`horizon` must be a positive"),
        (lambda: SeriesConfig(name="x", window=True), ValueError, "`window` must be a positive"),
        (lambda: WeatherConfig(name="x", lead=-1), ValueError, r"`lead` must be an integer >= 0"),
        (lambda: datasets.builder("seattle"), ValueError, "`name` must be one of seattle_temps"),
        (lambda: datasets.builder("sunspots", config=3), TypeError, "`config` must be a config"),
        (
            lambda: datasets.builder("seattle_temps", config="next_week"),
            ValueError,
            "`config` of `seattle_temps` must be one of next_hour, next_day or a SeriesConfig",
        ),
        (lambda: datasets.builder("sunspots", data_dir=3), TypeError, "`data_dir` must be a path"),
        (lambda: datasets.load("sunspots", split=0), TypeError, "`split` must be a string"),
        (lambda: datasets.load("sunspots", batch_size=0), ValueError, "`batch_size` must be"),
    ],
)
def test_bad_arguments_are_named_in_the_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_window_longer_than_a_split_is_refused(tmp_path, offline):
    config = SeriesConfig(name="too_long", window=60, horizon=1)
    with pytest.raises(ValueError, match=r"`window` \+ `horizon` spans 61 steps.*only 46"):
        datasets.builder("sunspots", config=config, data_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("seattle_temps", "vega_datasets", "vega_datasets"),
        ("seattle_weather", "vega_datasets", "vega_datasets"),
        ("mauna_loa_co2", "statsmodels.datasets", "statsmodels"),
        ("sunspots", "statsmodels.datasets", "statsmodels"),
    ],
)
def test_a_missing_source_package_says_what_to_install(
    tmp_path, monkeypatch, name, module, package
):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=f"`{package}` package.*pip install {package}"):
        datasets.builder(name, data_dir=tmp_path)

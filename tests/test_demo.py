"""The README's first command: `keras-lstm demo` learns, compares and saves."""

import json

import keras
import numpy as np

from keras_lstm import cli, demo
from keras_lstm.datasets import seattle_hourly_temperatures


def test_windows_split_by_time_without_leakage():
    times, temps = seattle_hourly_temperatures()
    assert len(temps) == 8759 and np.all(np.diff(times.astype("int64")) > 0)
    train, val, test, scale = demo.make_windows(times, temps)
    assert train.x.shape[1:] == (demo.WINDOW, 3) and train.y.shape[1:] == (1,)
    # Every target lies after every training target: the three parts follow each other in time.
    assert len(train.x) + len(val.x) + len(test.x) == len(temps) - 3 * demo.WINDOW
    np.testing.assert_allclose(test.truth[-1], temps[-1])
    np.testing.assert_allclose(test.last, temps[-len(test.x) - 1 : -1])
    np.testing.assert_allclose(
        train.y[:, 0] * scale["delta_std"], train.truth - train.last, atol=1e-4
    )


def test_demo_beats_persistence_and_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Test MAE" in printed and "persistence" in printed and "keras.layers.LSTM" in printed

    results = json.loads((out / "results.json").read_text())["test_mae_fahrenheit"]
    persistence = results["persistence (next hour = this hour)"]
    ours = results["keras_lstm.GatedLSTM"]
    assert ours < 0.9 * persistence, results
    assert results["keras.layers.LSTM"] < persistence, results

    model = keras.saving.load_model(out / "model.keras")
    times, temps = seattle_hourly_temperatures()
    _, _, test, scale = demo.make_windows(times, temps)
    change = model.predict(test.x, verbose=0)[:, 0] * scale["delta_std"]
    np.testing.assert_allclose(np.mean(np.abs(test.last + change - test.truth)), ours, rtol=1e-4)
    assert [
        p.name for p in out.iterdir() if p.name.startswith(".")
    ] == []  # no temporary files left

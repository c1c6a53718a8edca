"""The `keras-lstm demo` job: next-hour temperature forecasting in Seattle.

A GatedLSTM reads the last 24 hours (temperature and the hour of day) and
predicts the change to the next hour. It is scored on the last 15 % of 2010,
which it never sees in training, against two baselines: persistence (the next
hour equals this hour) and `keras.layers.LSTM` trained the same way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import keras
import numpy as np

from keras_lstm._atomic import atomic_file
from keras_lstm.datasets import seattle_hourly_temperatures
from keras_lstm.layer import GatedLSTM

WINDOW = 24


@dataclass
class Windows:
    """Inputs `(n, WINDOW, 3)`, targets `(n, 1)` and the last observed temperature."""

    x: np.ndarray
    y: np.ndarray
    last: np.ndarray
    truth: np.ndarray


def make_windows(times, temps, window: int = WINDOW, splits=(0.7, 0.15)):
    """Split the series by time and cut each part into (window -> next hour) pairs.

    The scale (mean and spread of the hourly change and of the temperature)
    comes from the training part alone, so nothing of the future leaks in.
    """
    n = len(temps)
    cut_train = int(n * splits[0])
    cut_val = int(n * (splits[0] + splits[1]))
    train_temps = temps[:cut_train]
    level_mean, level_std = train_temps.mean(), train_temps.std()
    delta_std = np.diff(train_temps).std()
    hour = times.astype("datetime64[h]").astype(np.int64) % 24
    features = np.stack(
        [
            (temps - level_mean) / level_std,
            np.sin(2 * np.pi * hour / 24),
            np.cos(2 * np.pi * hour / 24),
        ],
        axis=-1,
    ).astype(np.float32)

    def cut(start, stop):
        # Targets run from start + window to stop - 1, so windows never cross a split.
        ends = np.arange(max(start, 0) + window, stop)
        x = np.stack([features[e - window : e] for e in ends])
        last = temps[ends - 1]
        truth = temps[ends]
        y = ((truth - last) / delta_std)[:, None].astype(np.float32)
        return Windows(x, y, last, truth)

    scale = {"delta_std": float(delta_std)}
    return cut(0, cut_train), cut(cut_train, cut_val), cut(cut_val, n), scale


def build_model(recurrent_layer: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((WINDOW, 3), name="last_24_hours")
    hidden = recurrent_layer(inputs)
    outputs = keras.layers.Dense(1, name="next_hour_change")(hidden)
    return keras.Model(inputs, outputs)


def _fit(model, train, val, epochs, verbose, seed):
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", jit_compile=True)
    model.fit(
        train.x,
        train.y,
        validation_data=(val.x, val.y),
        epochs=epochs,
        batch_size=64,
        verbose=verbose,
        callbacks=[keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)],
    )


def _mae(model, part, scale):
    change = model.predict(part.x, batch_size=512, verbose=0)[:, 0] * scale["delta_std"]
    return float(np.mean(np.abs(part.last + change - part.truth)))


OUTPUT_FILES = ("model.keras", "results.json")


def check_out(out: str | os.PathLike, name: str = "out") -> None:
    """Raise a `ValueError` if the demo could not write its files into `out`.

    Checked before any training, so that a wrong path fails at once rather
    than after a minute of training: `out` must be a folder, or a path
    whose nearest existing parent is a writable folder, and
    `out/model.keras` and `out/results.json` must not be folders.
    `name` is how the message calls the argument (the command line says
    `--out`).
    """
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}` must be a folder, but `{out}` is a file.")
    for file in OUTPUT_FILES:
        if os.path.isdir(os.path.join(path, file)):
            raise ValueError(
                f"`{name}`: `{os.path.join(out, file)}` is a folder, where the demo writes a file."
            )
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"`{name}` folder `{out}` cannot be created: `{existing}` is a file, not a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"`{name}` folder `{out}` cannot be written: `{existing}` is not writable."
        )


def run(out: str = "keras-lstm-demo", epochs: int = 8, units: int = 32, verbose="auto", seed=0):
    """Train, compare and save. Returns the test MAE of each model, in °F.

    `out` is checked first (`check_out`), so a path the demo could not write
    fails before the training.
    """
    check_out(out)
    times, temps = seattle_hourly_temperatures()
    train, val, test, scale = make_windows(times, temps)
    print(
        f"Seattle hourly temperatures 2010: {len(temps)} hours -> "
        f"{len(train.x)} train / {len(val.x)} validation / {len(test.x)} test windows of "
        f"{WINDOW} h"
    )
    results = {
        "persistence (next hour = this hour)": float(np.mean(np.abs(test.last - test.truth)))
    }
    models = {}
    for name, layer in [
        ("keras_lstm.GatedLSTM", GatedLSTM(units, name="gated_lstm")),
        ("keras.layers.LSTM", keras.layers.LSTM(units, name="keras_lstm_reference")),
    ]:
        print(f"\nTraining {name} ({units} units, XLA on)")
        keras.utils.set_random_seed(seed)
        model = build_model(layer)
        start = time.perf_counter()
        _fit(model, train, val, epochs, verbose, seed)
        results[name] = _mae(model, test, scale)
        print(f"{name}: test MAE {results[name]:.3f} °F in {time.perf_counter() - start:.0f} s")
        models[name] = model

    print("\nTest MAE, next-hour temperature (°F, lower is better)")
    width = max(map(len, results))
    for name, mae in results.items():
        print(f"  {name:<{width}}  {mae:6.3f}")

    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.keras")
    with atomic_file(model_path) as tmp:
        models["keras_lstm.GatedLSTM"].save(tmp)
    with atomic_file(os.path.join(out, "results.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(
                {"test_mae_fahrenheit": results, "scale": scale, "window": WINDOW}, f, indent=2
            )
    print(f"\nSaved the GatedLSTM model to {model_path}")
    return results

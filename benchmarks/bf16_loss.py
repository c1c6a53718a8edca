"""Loss curves under `mixed_bfloat16` against float32's, on Seattle's hourly temperatures.

The demo's task (next-hour temperature in Seattle, 2010, from the last 24
hours: `keras_lstm.demo`) is trained with a `GatedLSTM(units)` + `Dense(1)`
model several times under float32, each with its own seed, and as many
times under `mixed_bfloat16` with the same seeds (the output layer stays
float32, as Keras's mixed-precision guide advises). Every run trains the
same number of epochs on the same batches. The float32 runs' spread, epoch
by epoch, is the noise a change of seed makes; the bfloat16 mean is
compared with it. The native kernel's bfloat16 instructions
(`keras_lstm.kernels.bf16_products()`) are reported with the figures.

    PYTHONPATH=. python -m benchmarks.bf16_loss [--seeds 3] [--epochs 6] [--units 64] \\
        [--jit] [--out bench-bf16-loss]

Writes `<out>/bf16_loss.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DTYPES = ("float32", "mixed_bfloat16")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def train_once(policy, seed, data, epochs, units, jit, learning_rate):
    """Per-epoch training and validation losses, and the seconds, of one run."""
    import keras

    from keras_lstm import GatedLSTM
    from keras_lstm.demo import WINDOW

    train, val = data
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((WINDOW, train.x.shape[-1]))
        hidden = GatedLSTM(units, seed=seed)(inputs)
        outputs = keras.layers.Dense(1, dtype="float32")(hidden)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse", jit_compile=jit)
        start = time.perf_counter()
        history = model.fit(
            train.x,
            train.y,
            validation_data=(val.x, val.y),
            epochs=epochs,
            batch_size=64,
            shuffle=True,
            verbose=0,
        )
        seconds = time.perf_counter() - start
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "loss": [float(v) for v in history.history["loss"]],
        "val_loss": [float(v) for v in history.history["val_loss"]],
        "seconds": seconds,
    }


def summarise(runs, epochs, key):
    """Per epoch, of the loss `key` (`loss` or `val_loss`): each dtype's mean
    and spread over seeds; the mean over seeds of |bfloat16 - float32| with the
    same seed (`paired_difference`); and whether bfloat16's mean lies within
    float32's range over seeds widened by its standard deviation (the noise
    a seed makes)."""
    rows = []
    for epoch in range(epochs):
        row = {"epoch": epoch + 1}
        row["paired_difference"] = statistics.fmean(
            abs(b[key][epoch] - f[key][epoch])
            for f, b in zip(runs["float32"], runs["mixed_bfloat16"], strict=True)
        )
        for dtype in DTYPES:
            values = [run[key][epoch] for run in runs[dtype]]
            row[dtype] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        f32, bf16 = row["float32"], row["mixed_bfloat16"]
        low, high = f32["min"] - f32["std"], f32["max"] + f32["std"]
        row["within_float32_noise"] = low <= bf16["mean"] <= high
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive, default=3, help="runs per dtype (default 3)")
    parser.add_argument("--epochs", type=positive, default=6, help="epochs per run (default 6)")
    parser.add_argument("--units", type=positive, default=64, help="GatedLSTM units (default 64)")
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)"
    )
    parser.add_argument("--jit", action="store_true", help="compile with jit_compile=True")
    parser.add_argument("--out", default="bench-bf16-loss", help="folder for bf16_loss.json")
    args = parser.parse_args(argv)

    from benchmarks.run import _machine
    from keras_lstm import kernels
    from keras_lstm._atomic import atomic_file
    from keras_lstm.datasets import seattle_hourly_temperatures
    from keras_lstm.demo import make_windows

    times, temps = seattle_hourly_temperatures()
    train, val, _test, _scale = make_windows(times, temps)
    runs = {dtype: [] for dtype in DTYPES}
    for seed in range(args.seeds):
        for dtype in DTYPES:  # interleaved: a slow moment of the machine hits both
            run = train_once(
                dtype, seed, (train, val), args.epochs, args.units, args.jit, args.learning_rate
            )
            runs[dtype].append(run)
            print(
                f"seed {seed} {dtype:<15} train loss by epoch "
                + " ".join(f"{v:.4f}" for v in run["loss"])
                + ", validation "
                + " ".join(f"{v:.4f}" for v in run["val_loss"])
                + f"  ({run['seconds']:.1f} s)"
            )
    tables = {key: summarise(runs, args.epochs, key) for key in ("loss", "val_loss")}
    result = {
        "command": "python -m benchmarks.bf16_loss "
        + f"--seeds {args.seeds} --epochs {args.epochs} --units {args.units} "
        + f"--learning-rate {args.learning_rate:g}"
        + (" --jit" if args.jit else ""),
        "machine": _machine(),
        "native_kernel": kernels.native_available(jit_compile=args.jit),
        "bf16_products": kernels.bf16_products() or "none (float32 products)",
        "runs": runs,
        "epochs": tables,
    }
    print(
        f"\nnative kernel: {result['native_kernel']}; bfloat16 products: {result['bf16_products']}"
    )
    for key, title in (("loss", "training loss"), ("val_loss", "validation loss")):
        print(
            f"\n| epoch | float32 {title}, mean ± sd over seeds (min–max) | "
            "mixed_bfloat16, mean ± sd | same seed, mean abs difference | within float32's noise |"
        )
        print("|---|---|---|---|---|")
        for row in tables[key]:
            f32, bf16 = row["float32"], row["mixed_bfloat16"]
            print(
                f"| {row['epoch']} | {f32['mean']:.4f} ± {f32['std']:.4f} ({f32['min']:.4f}–"
                f"{f32['max']:.4f}) | {bf16['mean']:.4f} ± {bf16['std']:.4f} | "
                f"{row['paired_difference']:.4f} | "
                f"{'yes' if row['within_float32_noise'] else 'no'} |"
            )
    seconds = {d: statistics.fmean(r["seconds"] for r in runs[d]) for d in DTYPES}
    print(
        "\nmean seconds a run: "
        + ", ".join(f"{d} {s:.1f}" for d, s in seconds.items())
        + f" ({seconds['float32'] / seconds['mixed_bfloat16']:.2f}x)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "bf16_loss.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bf16_loss.json'}")
    return result


if __name__ == "__main__":
    main()

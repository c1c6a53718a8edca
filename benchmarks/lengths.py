"""Times variable-length batches: what a masked, right-padded batch costs.

Run `python -m benchmarks.lengths` (add `--quick` for a smoke run). For each
batch of sequences of unequal lengths it times, interleaved round by round in
a rotating order as `benchmarks.run` does, a training step (forward,
gradients, SGD update) and an inference call of:

- `GatedLSTM`, masked: the batch padded to its longest row, a `Masking` layer;
- `GatedLSTM`, masked, the mask passed in: the same batch and its mask as the
  model's two inputs, with no `Masking` layer (what the layer costs apart
  from Keras's `Masking`, which reads and writes the whole padded batch);
- `GatedLSTM`, unmasked, at that full length: every padded step computed;
- `GatedLSTM`, unmasked, at the mean length: a batch holding as many steps as
  the masked one holds real steps, the cost to aim at;
- `keras.layers.LSTM`, masked (Keras's own layer, as `GatedLSTM`);
- `torch.nn.LSTM` on the padded batch, its loss at each row's last real step,
  and on a `pack_padded_sequence`;
- `tf.data`'s `bucket_by_sequence_length`, as users bucket unequal lengths
  today: the same sequences bucketed by length, each bucket padded to its
  longest row and run masked through `GatedLSTM` (one step a bucket, the
  dataset's iteration included; the figure is a pass over all sequences).

Every Keras model ends at the layer's last output (`return_sequences=False`),
with a mean-squared loss, as `benchmarks.run`. Each figure is the median over
the rounds; the ratio column divides it by the unmasked batch at the mean
length. Batches (`--batches`): `lognormal`, 64 rows with lengths drawn
log-normal (median about 126, mean about 164); `wide`, 32 rows with lengths
spread geometrically from 10 to 2,000. Writes `<out>/lengths.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.run import _log, _machine, _time_per_call, interleave  # noqa: E402

OURS = "GatedLSTM"
ROWS = (
    "GatedLSTM, masked",
    "GatedLSTM, masked, mask passed in",
    "GatedLSTM, unmasked (full length)",
    "GatedLSTM, unmasked (mean length)",
    "keras.layers.LSTM, masked",
    "torch.nn.LSTM, padded",
    "torch.nn.LSTM, pack_padded_sequence",
    "GatedLSTM, tf.data bucket_by_sequence_length",
)
REFERENCE = "GatedLSTM, unmasked (mean length)"


def lognormal_lengths(batch: int, median: float, mean: float, seed: int = 0) -> list[int]:
    """`batch` lengths drawn log-normal with the given median and mean (at least 1)."""
    import numpy as np

    sigma = (2 * np.log(mean / median)) ** 0.5
    rng = np.random.default_rng(seed)
    draws = rng.lognormal(np.log(median), sigma, size=batch)
    return [max(1, round(v)) for v in draws]


def wide_lengths(batch: int, shortest: int, longest: int) -> list[int]:
    """`batch` lengths spread geometrically from `shortest` to `longest`."""
    import numpy as np

    return [round(v) for v in np.geomspace(shortest, longest, batch)]


BATCHES = {
    "lognormal": lambda quick: (
        lognormal_lengths(8, 12, 16) if quick else lognormal_lengths(64, 126, 164)
    ),
    "wide": lambda quick: wide_lengths(4, 2, 30) if quick else wide_lengths(32, 10, 2000),
}


def _padded(lengths, features, seed=1):
    """Right-padded inputs (B, longest, D), zeros after each row's length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    longest = max(lengths)
    x = rng.normal(size=(len(lengths), longest, features)).astype("float32")
    for row, length in enumerate(lengths):
        x[row, length:] = 0.0
    return x


def _keras_steps(layer, x, masked, jit, mask_input=False):
    """`(model, train_step, infer_step)`; with `mask_input` the model's inputs
    are `[x, mask]` and the mask reaches the layer as is, else `masked` puts a
    `Masking` layer before it."""
    import keras
    import tensorflow as tf

    if mask_input:
        sequences = keras.Input((None, x.shape[-1]))
        mask = keras.Input((None,), dtype="bool")
        model = keras.Model([sequences, mask], layer(sequences, mask=mask))
    else:
        layers = [keras.Input((None, x.shape[-1]))]
        if masked:
            layers.append(keras.layers.Masking(0.0))
        model = keras.Sequential([*layers, layer])
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def infer_step(x):
        return model(x, training=False)

    return model, train_step, infer_step


def _keras_contender(name, lengths, features, units, jit):
    import keras
    import tensorflow as tf

    from keras_lstm import GatedLSTM

    masked = "masked" in name and "unmasked" not in name
    mask_input = "mask passed in" in name
    if name == REFERENCE:
        x = _padded([round(statistics.mean(lengths))] * len(lengths), features)
    else:
        x = _padded(lengths, features)
    layer = keras.layers.LSTM(units) if name.startswith("keras") else GatedLSTM(units)
    _, train_step, infer_step = _keras_steps(layer, x, masked, jit, mask_input)
    inputs = tf.constant(x)
    if mask_input:
        steps = tf.range(x.shape[1])[None, :]
        inputs = [inputs, steps < tf.constant(lengths)[:, None]]
    y = tf.random.normal((len(lengths), units), seed=2)
    return (lambda: train_step(inputs, y).numpy()), (lambda: infer_step(inputs).numpy())


def _bucketed_contender(lengths, features, units, jit):
    """`bucket_by_sequence_length` over the same sequences, a masked step a bucket."""
    import tensorflow as tf

    from keras_lstm import GatedLSTM

    x = _padded(lengths, features)
    sequences = tf.RaggedTensor.from_tensor(x, lengths=lengths)
    longest = max(lengths)
    # Boundaries doubling from the shortest length, as one sizes buckets for a corpus.
    boundaries, bound = [], max(2, min(lengths))
    while bound < longest:
        bound *= 2
        boundaries.append(bound)
    batch = len(lengths)
    dataset = (
        tf.data.Dataset.from_tensor_slices(sequences)
        .map(lambda seq: seq.to_tensor() if isinstance(seq, tf.RaggedTensor) else seq)
        .bucket_by_sequence_length(
            lambda seq: tf.shape(seq)[0],
            bucket_boundaries=boundaries,
            bucket_batch_sizes=[batch] * (len(boundaries) + 1),
        )
        .prefetch(1)
    )
    _, train_step, infer_step = _keras_steps(GatedLSTM(units), x, True, jit)
    y = tf.random.normal((batch, units), seed=2)

    def train():
        for padded in dataset:
            train_step(padded, y[: tf.shape(padded)[0]]).numpy()

    def infer():
        for padded in dataset:
            infer_step(padded).numpy()

    return train, infer


def _torch_contender(lengths, features, units, packed):
    import torch

    batch = len(lengths)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(features, units, batch_first=True)
    optimizer = torch.optim.SGD(lstm.parameters(), lr=0.01)
    x = torch.from_numpy(_padded(lengths, features))
    y = torch.randn(batch, units)
    length_tensor = torch.tensor(lengths)
    last = length_tensor - 1

    def forward():
        if packed:
            sequences = torch.nn.utils.rnn.pack_padded_sequence(
                x, length_tensor, batch_first=True, enforce_sorted=False
            )
            _, (h, _) = lstm(sequences)
            return h[-1]
        out, _ = lstm(x)
        return out[torch.arange(batch), last]

    def train():
        optimizer.zero_grad()
        loss = torch.mean((forward() - y) ** 2)
        loss.backward()
        optimizer.step()
        return loss.item()

    def infer():
        with torch.no_grad():
            return forward().sum().item()

    # As benchmarks.run: torch's better thread setting on this machine.
    default_threads = torch.get_num_threads()
    timings = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        train()
        timings[threads] = min(_time_per_call(train, 1) for _ in range(2))
    best = min(timings, key=timings.get)

    def with_threads(fn):
        def run():
            torch.set_num_threads(best)
            return fn()

        return run

    return with_threads(train), with_threads(infer)


def _bench(lengths, features, units, rounds, target_s, with_torch, jit):
    contenders = {}
    for name in ROWS:
        if name.startswith("torch"):
            if with_torch and not jit:
                contenders[name] = _torch_contender(lengths, features, units, "pack" in name)
        elif "bucket" in name:
            contenders[name] = _bucketed_contender(lengths, features, units, jit)
        else:
            contenders[name] = _keras_contender(name, lengths, features, units, jit)
    results = {name: {"train_s": [], "infer_s": []} for name in contenders}
    for name, (train, infer) in contenders.items():
        for kind, fn in (("train", train), ("infer", infer)):
            fn()  # tracing, compiling
            start = time.perf_counter()
            fn()
            results[name][f"warm_{kind}_s"] = time.perf_counter() - start
    interleave(contenders, results, rounds, target_s, most_repeats=50)
    summary = {
        name: {
            "train_ms": 1e3 * statistics.median(res["train_s"]),
            "infer_ms": 1e3 * statistics.median(res["infer_s"]),
            "train_s_rounds": res["train_s"],
            "infer_s_rounds": res["infer_s"],
        }
        for name, res in results.items()
    }
    reference = summary[REFERENCE]
    for row in summary.values():
        row["train_ratio"] = row["train_ms"] / reference["train_ms"]
        row["infer_ratio"] = row["infer_ms"] / reference["infer_ms"]
    return summary


def _table(run) -> str:
    lengths = run["lengths"]
    head = (
        f"{run['batch']}: B={len(lengths)}, D={run['features']}, H={run['units']}, lengths "
        f"median {statistics.median(lengths):g}, mean {statistics.mean(lengths):.0f}, "
        f"longest {max(lengths)} ({run['mode']})"
    )
    lines = [
        head,
        "",
        "| | train step (ms) | x mean-length | inference (ms) | x mean-length |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in run["rows"].items():
        lines.append(
            f"| {name} | {row['train_ms']:.1f} | {row['train_ratio']:.2f} | "
            f"{row['infer_ms']:.1f} | {row['infer_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lengths", description=__doc__)
    parser.add_argument(
        "--batches", default="lognormal,wide", help=f"comma-separated, of {', '.join(BATCHES)}"
    )
    parser.add_argument("--features", type=int, default=None, help="D (default 32; 4 --quick)")
    parser.add_argument("--units", type=int, default=None, help="H (default 128; 8 --quick)")
    parser.add_argument("--modes", default="eager", help="eager, jit or both (default eager)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5; 2 with --quick")
    parser.add_argument(
        "--target-seconds", type=float, default=None, help="per measurement (default 0.3)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 rounds")
    parser.add_argument("--no-torch", action="store_true", help="leave torch.nn.LSTM out")
    parser.add_argument("--out", default="benchmarks/results", help="directory for lengths.json")
    args = parser.parse_args(argv)

    batches = [b.strip() for b in args.batches.split(",") if b.strip()]
    unknown = [b for b in batches if b not in BATCHES]
    if not batches or unknown:
        raise SystemExit(f"--batches: expected some of {', '.join(BATCHES)}, got {args.batches!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("eager", "jit") for m in modes):
        raise SystemExit(f"--modes: expected 'eager', 'jit' or 'eager,jit', got {args.modes!r}")
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        raise SystemExit(f"--rounds must be a positive integer, got {rounds}")
    features = args.features or (4 if args.quick else 32)
    units = args.units or (8 if args.quick else 128)
    target_s = args.target_seconds or (0.02 if args.quick else 0.3)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            _log("torch is not installed: leaving torch.nn.LSTM out")
            with_torch = False

    import tensorflow as tf

    from keras_lstm import kernels

    result = {
        "machine": _machine(),
        "tensorflow": tf.__version__,
        "native_kernel": kernels.native_available(),
        "command": " ".join(["python -m benchmarks.lengths", *(argv or sys.argv[1:])]),
        "runs": [],
    }
    for batch in batches:
        lengths = BATCHES[batch](args.quick)
        for mode in modes:
            _log(f"{batch} ({mode}): {len(lengths)} rows, longest {max(lengths)}")
            rows = _bench(lengths, features, units, rounds, target_s, with_torch, mode == "jit")
            run = {
                "batch": batch,
                "mode": mode,
                "lengths": lengths,
                "features": features,
                "units": units,
                "rows": rows,
            }
            result["runs"].append(run)
            print(_table(run) + "\n", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lengths.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Times GatedLSTM against keras.layers.LSTM, keras.layers.RNN(LSTMCell) and torch.nn.LSTM.

Run `python -m benchmarks.run` (add `--quick` for a smoke run). Every
contender runs in this one process, interleaved round by round in a rotating
order, and each figure is the median over rounds. For each size (B, T, D, H)
and each mode (`eager`: Keras's compiled step without XLA; `jit`:
`jit_compile=True`) it reports training and inference sequences per second,
the ratios to each anchor, the share of the matmul limit (the same matmuls
timed alone), the peak memory of one training step and the XLA compile time.
`--options peephole,cifg,...` (or `all`) adds a `GatedLSTM` row per cell
option, and `--dtype float32,mixed_bfloat16` rows under bfloat16 mixed
precision (GatedLSTM, keras.layers.LSTM, and torch.nn.LSTM under
`torch.autocast("cpu", dtype=torch.bfloat16)` in eager mode); each such row
also shows its cost against the plain float32 GatedLSTM of the same run.
Writes `<out>/benchmark.json` and `<out>/benchmark.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SIZES = "64x100x32x128,32x24x8x64,256x50x64x256,1x100x32x128"
QUICK_SIZES = "8x12x4x16"
OURS = "GatedLSTM"
_TORCH_DEFAULT_THREADS = 1
ANCHORS = ("keras.layers.LSTM", "keras.layers.RNN(LSTMCell)", "torch.nn.LSTM")
# `--options`: one GatedLSTM row each ("half": proj_units = H // 2).
OPTION_PRESETS = {
    "recurrent_dropout": {"recurrent_dropout": 0.2},
    "dropout": {"dropout": 0.2},
    "peephole": {"peephole": True},
    "cifg": {"cifg": True},
    "cell_clip": {"cell_clip": 3.0},
    "peephole+cifg+cell_clip": {"peephole": True, "cifg": True, "cell_clip": 3.0},
    "layer_norm": {"layer_norm": True},
    "proj_units": {"proj_units": "half"},
    "zoneout_h": {"zoneout_h": 0.1},
}
DTYPES = ("float32", "mixed_bfloat16")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(
                f"--sizes: expected items like 64x100x32x128 (B x T x D x H), got {item!r}"
            )
        sizes.append(tuple(int(p) for p in parts))
    return sizes


class _PeakRss:
    """Samples the resident set size every millisecond; `peak` is the rise above the start."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.start = self.peak_rss = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak = self.peak_rss - self.start


class _PeakTensorFlow:
    """Peak bytes held by TensorFlow's CPU allocator during the block, above the start."""

    def __enter__(self):
        import tensorflow as tf

        self._tf = tf
        self.start = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        return self

    def __exit__(self, *exc):
        self.peak = self._tf.config.experimental.get_memory_info("CPU:0")["peak"] - self.start


def _option_name(option: str) -> str:
    return f"{OURS}({option})"


def _dtype_name(name: str, dtype: str) -> str:
    return f"{name} [{'autocast bfloat16' if name == ANCHORS[2] else dtype}]"


def _keras_contender(name, size, jit, options=None, dtype=None):
    import keras
    import tensorflow as tf

    from keras_lstm import GatedLSTM

    batch, steps, features, units = size
    options = {
        key: units // 2 if value == "half" else value for key, value in (options or {}).items()
    }
    layer = {
        OURS: lambda: GatedLSTM(units, dtype=dtype, **options),
        "keras.layers.LSTM": lambda: keras.layers.LSTM(units, dtype=dtype),
        "keras.layers.RNN(LSTMCell)": lambda: keras.layers.RNN(keras.layers.LSTMCell(units)),
    }[name]()
    model = keras.Sequential([keras.Input((steps, features), batch_size=batch), layer])
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    x = tf.random.normal((batch, steps, features), seed=1)
    y = tf.random.normal((batch, model.output_shape[-1]), seed=2)

    @tf.function(jit_compile=jit)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            out = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(out - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function(jit_compile=jit)
    def infer_step(x):
        return model(x, training=False)

    return (lambda: train_step(x, y).numpy()), (lambda: infer_step(x).numpy())


def _torch_contender(size, autocast=False):
    import torch

    batch, steps, features, units = size
    train, infer = _torch_steps(size, autocast)
    # On a loaded machine torch's OpenMP threads can spin against each other
    # and run far slower than one thread: give torch its better setting.
    timings = {}
    for threads in sorted({1, _TORCH_DEFAULT_THREADS}):
        torch.set_num_threads(threads)
        train()
        timings[threads] = min(_time_per_call(train, 1) for _ in range(3))
    best = min(timings, key=timings.get)
    _log(f"    torch threads: {best} (train step s by threads: {timings})")

    def with_threads(fn):
        def run():
            torch.set_num_threads(best)
            return fn()

        return run

    return with_threads(train), with_threads(infer)


def _torch_steps(size, autocast=False):
    import contextlib

    import torch

    def cast():
        if not autocast:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    batch, steps, features, units = size
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(features, units, batch_first=True)
    optimizer = torch.optim.SGD(lstm.parameters(), lr=0.01)
    x = torch.randn(batch, steps, features)
    y = torch.randn(batch, units)

    def train():
        optimizer.zero_grad()
        with cast():
            out, _ = lstm(x)
        loss = torch.mean((out[:, -1].float() - y) ** 2)
        loss.backward()
        optimizer.step()
        return loss.item()

    def infer():
        with torch.no_grad(), cast():
            return lstm(x)[0][:, -1].float().sum().item()

    return train, infer


def _matmul_limit(size):
    """The matmuls a fused LSTM must do, alone: big input/weight GEMMs and T step GEMMs."""
    import tensorflow as tf

    batch, steps, features, units = size
    x = tf.random.normal((steps * batch, features))
    w = tf.random.normal((features, 4 * units))
    u = tf.random.normal((units, 4 * units))
    h = tf.random.normal((steps, batch, units))
    dz = tf.random.normal((steps, batch, 4 * units))

    @tf.function
    def forward():
        out = [tf.matmul(x, w)]
        out += [tf.matmul(h[t], u) for t in range(steps)]
        return [tf.reduce_sum(o[:1, :1]) for o in out]

    @tf.function
    def backward():
        out = [tf.matmul(dz[t], u, transpose_b=True) for t in range(steps)]
        flat = tf.reshape(dz, (-1, 4 * units))
        out.append(tf.matmul(flat, w, transpose_b=True))  # dx
        out.append(tf.matmul(x, flat, transpose_a=True))  # dW
        out.append(tf.matmul(tf.reshape(h, (-1, units)), flat, transpose_a=True))  # dU
        return [tf.reduce_sum(o[:1, :1]) for o in out]

    def train():
        forward()
        backward()

    return train, forward


def interleave(contenders, results, rounds, target_s, most_repeats):
    """Times each contender's `(train, infer)` in `rounds` rounds, the order rotating
    each round so that no contender always runs first; each timing repeats a call
    for about `target_s` (by its warm time). Appends to `results[name]["train_s"]`
    and `["infer_s"]`."""
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            train, infer = contenders[name]
            for kind, fn in (("train", train), ("infer", infer)):
                warm = results[name][f"warm_{kind}_s"]
                repeats = max(1, min(most_repeats, round(target_s / max(warm, 1e-6))))
                results[name][f"{kind}_s"].append(_time_per_call(fn, repeats))
        _log(f"    round {r + 1}/{rounds} done")


def _time_per_call(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _bench_size(size, mode, rounds, with_torch, target_s, options=(), dtypes=("float32",)):
    jit = mode == "jit"
    contenders = {}
    for name in (OURS, *ANCHORS[:2]):
        contenders[name] = _keras_contender(name, size, jit)
    if with_torch and not jit:
        contenders[ANCHORS[2]] = _torch_contender(size)
    # The extra rows: GatedLSTM with each option, and each contender under another dtype.
    extra = {}
    for option in options:
        extra[_option_name(option)] = _keras_contender(OURS, size, jit, OPTION_PRESETS[option])
    for dtype in dtypes:
        if dtype == "float32":
            continue
        for name in (OURS, ANCHORS[0]):
            extra[_dtype_name(name, dtype)] = _keras_contender(name, size, jit, dtype=dtype)
        if with_torch and not jit:
            extra[_dtype_name(ANCHORS[2], dtype)] = _torch_contender(size, autocast=True)
    contenders.update(extra)
    contenders["matmul limit"] = _matmul_limit(size)

    results = {name: {"train_s": [], "infer_s": []} for name in contenders}
    # First calls: tracing and (under jit) XLA compilation; then one more call
    # so the repeat count below is calibrated on warm code.
    for name, (train, infer) in contenders.items():
        for kind, fn in (("train", train), ("infer", infer)):
            start = time.perf_counter()
            fn()
            results[name][f"first_{kind}_s"] = time.perf_counter() - start
            start = time.perf_counter()
            fn()
            results[name][f"warm_{kind}_s"] = time.perf_counter() - start
        probe = _PeakRss() if name == ANCHORS[2] else _PeakTensorFlow()
        with probe:
            train()
        results[name]["peak_train_mib"] = probe.peak / 2**20
    interleave(contenders, results, rounds, target_s, most_repeats=200)

    batch = size[0]
    summary = {}
    for name, res in results.items():
        train_s, infer_s = statistics.median(res["train_s"]), statistics.median(res["infer_s"])
        summary[name] = {
            "train_seq_per_s": batch / train_s,
            "infer_seq_per_s": batch / infer_s,
            "infer_step_latency_us": infer_s / size[1] * 1e6,
            "peak_train_mib": res["peak_train_mib"],
            "first_train_call_s": res["first_train_s"],
            "first_infer_call_s": res["first_infer_s"],
            "xla_compile_s": (
                res["first_train_s"] + res["first_infer_s"] - train_s - infer_s if jit else None
            ),
            "train_s_rounds": res["train_s"],
            "infer_s_rounds": res["infer_s"],
        }
    limit = summary.pop("matmul limit")
    for row in summary.values():
        row["train_pct_of_matmul_limit"] = 100 * row["train_seq_per_s"] / limit["train_seq_per_s"]
        row["infer_pct_of_matmul_limit"] = 100 * row["infer_seq_per_s"] / limit["infer_seq_per_s"]
        for anchor in ANCHORS:
            if anchor in summary:
                a = summary[anchor]
                row[f"train_ratio_to {anchor}"] = row["train_seq_per_s"] / a["train_seq_per_s"]
                row[f"infer_ratio_to {anchor}"] = row["infer_seq_per_s"] / a["infer_seq_per_s"]
    plain = summary[OURS]
    for name in extra:
        row = summary[name]
        # Cost: how many times longer than the plain float32 GatedLSTM a step takes.
        row["train_cost_vs_plain"] = plain["train_seq_per_s"] / row["train_seq_per_s"]
        row["infer_cost_vs_plain"] = plain["infer_seq_per_s"] / row["infer_seq_per_s"]
    return {"contenders": summary, "matmul_limit": limit, "extra_rows": list(extra)}


def _torch_ratios_for_jit(runs):
    """torch has no jit mode here: compare jit rows with torch's eager figures."""
    torch_rows = {
        r["size"]: r["contenders"][ANCHORS[2]]
        for r in runs
        if r["mode"] == "eager" and ANCHORS[2] in r["contenders"]
    }
    for run in runs:
        anchor = torch_rows.get(run["size"])
        if run["mode"] != "jit" or anchor is None:
            continue
        for row in run["contenders"].values():
            for kind in ("train", "infer"):
                row[f"{kind}_ratio_to {ANCHORS[2]}"] = (
                    row[f"{kind}_seq_per_s"] / anchor[f"{kind}_seq_per_s"]
                )


def _machine():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["load_average_at_start"] = os.getloadavg()
    return info


def _chart(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [OURS, *ANCHORS]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, metric, title in (
        (axes[0], "train_seq_per_s", "training"),
        (axes[1], "infer_seq_per_s", "inference"),
    ):
        labels = [f"{r['size']}\n{r['mode']}" for r in runs]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(runs))]
            values = [r["contenders"].get(name, {}).get(metric, 0) for r in runs]
            ax.bar(xs, values, width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(range(len(runs)), labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("sequences / s (log)")
        ax.set_title(f"{title}, (B, T, D, H) and mode")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(result) -> str:
    lines = [
        "| size (B,T,D,H) | mode | contender | train seq/s | infer seq/s | train vs keras LSTM "
        "| train vs torch | infer vs torch | train % matmul limit | infer step µs "
        "| peak train MiB | XLA compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for name, row in run["contenders"].items():

            def ratio(kind, anchor, row=row):
                value = row.get(f"{kind}_ratio_to {anchor}")
                return f"{value:.2f}x" if value is not None else "–"

            compile_s = row["xla_compile_s"]
            lines.append(
                f"| {run['size']} | {run['mode']} | {name} | {row['train_seq_per_s']:,.0f} "
                f"| {row['infer_seq_per_s']:,.0f} | {ratio('train', ANCHORS[0])} "
                f"| {ratio('train', ANCHORS[2])} | {ratio('infer', ANCHORS[2])} "
                f"| {row['train_pct_of_matmul_limit']:.0f} % | {row['infer_step_latency_us']:.1f} "
                f"| {row['peak_train_mib']:.1f} "
                f"| {'–' if compile_s is None else f'{compile_s:.1f}'} |"
            )
    extra = [run for run in result["runs"] if run.get("extra_rows")]
    if extra:
        lines += [
            "",
            "| size (B,T,D,H) | mode | contender | train seq/s | infer seq/s "
            "| train cost vs GatedLSTM | infer cost vs GatedLSTM |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in extra:
            for name in [OURS, *run["extra_rows"]]:
                row = run["contenders"][name]
                lines.append(
                    f"| {run['size']} | {run['mode']} | {name} | {row['train_seq_per_s']:,.0f} "
                    f"| {row['infer_seq_per_s']:,.0f} | {row.get('train_cost_vs_plain', 1.0):.2f}x "
                    f"| {row.get('infer_cost_vs_plain', 1.0):.2f}x |"
                )
    return "\n".join(lines)


def _parse_list(flag: str, text: str, allowed, everything=None) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if everything is not None and items == ["all"]:
        return list(everything)
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise SystemExit(
            f"{flag}: expected names from {', '.join(allowed)}, separated by commas; "
            f"got {', '.join(map(repr, unknown))}"
        )
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--sizes", default=None, help=f"B x T x D x H, comma-separated (default {DEFAULT_SIZES})"
    )
    parser.add_argument("--modes", default="eager,jit", help="eager, jit or both (default both)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--target-seconds",
        type=float,
        default=None,
        help="time per measurement (default 0.4; 0.05 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}, 2 rounds"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave torch.nn.LSTM out")
    parser.add_argument(
        "--options",
        default="",
        help=f"cell options to add a GatedLSTM row for, comma-separated, or all "
        f"({', '.join(OPTION_PRESETS)})",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help=f"compute dtypes, comma-separated ({', '.join(DTYPES)}; default float32)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="directory for benchmark.json and benchmark.png"
    )
    args = parser.parse_args(argv)

    sizes = _parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("eager", "jit") for m in modes):
        raise SystemExit(f"--modes: expected 'eager', 'jit' or 'eager,jit', got {args.modes!r}")
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        raise SystemExit(f"--rounds must be a positive integer, got {rounds}")
    target_s = args.target_seconds or (0.05 if args.quick else 0.4)
    options = _parse_list("--options", args.options, OPTION_PRESETS, everything=OPTION_PRESETS)
    dtypes = _parse_list("--dtype", args.dtype, DTYPES) or ["float32"]
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            _log(
                "torch is not installed (pip install 'keras-lstm[bench]'): "
                "leaving torch.nn.LSTM out"
            )
            with_torch = False

    import keras
    import tensorflow as tf

    from keras_lstm import kernels
    from keras_lstm._atomic import atomic_file

    started = time.perf_counter()
    result = {
        "command": " ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": _machine(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "native_kernel": kernels.native_available(),
        "rounds": rounds,
        "runs": [],
    }
    if with_torch:
        import torch

        result["versions"]["torch"] = torch.__version__
        global _TORCH_DEFAULT_THREADS
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
        result["torch_default_threads"] = _TORCH_DEFAULT_THREADS
    total = len(sizes) * len(modes)
    for size in sizes:
        for mode in modes:
            label = "x".join(map(str, size))
            _log(f"[{len(result['runs']) + 1}/{total}] (B,T,D,H)={label} {mode} ...")
            run = _bench_size(size, mode, rounds, with_torch, target_s, options, dtypes)
            run.update(size=label, mode=mode)
            result["runs"].append(run)
            ours = run["contenders"][OURS]
            _log(
                f"    {OURS}: train {ours['train_seq_per_s']:,.0f} seq/s "
                f"({ours.get('train_ratio_to keras.layers.LSTM', 0):.2f}x keras.layers.LSTM), "
                f"infer {ours['infer_seq_per_s']:,.0f} seq/s"
            )
            keras.backend.clear_session()
    _torch_ratios_for_jit(result["runs"])
    result["runtime_s"] = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "benchmark.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    with atomic_file(out / "benchmark.png") as tmp:
        _chart(result, tmp)
    print(_table(result))
    _log(
        f"wrote {out / 'benchmark.json'} and {out / 'benchmark.png'} in {result['runtime_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

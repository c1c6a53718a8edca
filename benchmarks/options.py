"""What each cell option costs in training, against the plain fused layer and Keras.

Every contender (`GatedLSTM` plain, with each option, with recurrent
dropout; `keras.layers.LSTM` with and without recurrent dropout) is a
`GatedLSTM`/`LSTM` + `Dense(1)` model trained with `train_on_batch` on the
same random batch, all in this one process, interleaved round by round in a
rotating order. Each figure is the median over rounds of sequences per
second, and its cost relative to the plain `GatedLSTM`.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.options \\
        [--size 64x100x32x128] [--rounds 7] [--steps 5] [--jit]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONTENDERS = {
    "GatedLSTM(H)": ("ours", {}),
    "GatedLSTM(H, recurrent_dropout=0.2)": ("ours", {"recurrent_dropout": 0.2}),
    "GatedLSTM(H, dropout=0.2)": ("ours", {"dropout": 0.2}),
    "GatedLSTM(H, peephole=True)": ("ours", {"peephole": True}),
    "GatedLSTM(H, layer_norm=True)": ("ours", {"layer_norm": True}),
    "GatedLSTM(H, cifg=True)": ("ours", {"cifg": True}),
    "GatedLSTM(H, cell_clip=3.0)": ("ours", {"cell_clip": 3.0}),
    "GatedLSTM(H, proj_units=H/2)": ("ours", {"proj_units": "half"}),
    "GatedLSTM(H, zoneout_h=0.1)": ("ours", {"zoneout_h": 0.1}),
    "keras.layers.LSTM(H)": ("keras", {}),
    "keras.layers.LSTM(H, recurrent_dropout=0.2)": ("keras", {"recurrent_dropout": 0.2}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64x100x32x128", help="B x T x D x H")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="train_on_batch calls per round")
    parser.add_argument("--jit", action="store_true", help="compile with jit_compile=True")
    parser.add_argument("--only", default="", help="contender names to keep, separated by ;")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.serving import cpu_name
    from keras_lstm import GatedLSTM
    from keras_lstm.kernels import native_available

    b, t, d, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, d)).astype("float32")
    y = rng.standard_normal((b, 1)).astype("float32")
    wanted = [name for name in CONTENDERS if not args.only or name in args.only.split(";")]

    models = {}
    for name in wanted:
        kind, options = CONTENDERS[name]
        options = dict(options)
        if options.get("proj_units") == "half":
            options["proj_units"] = h // 2
        layer = GatedLSTM(h, **options) if kind == "ours" else keras.layers.LSTM(h, **options)
        model = keras.Sequential([keras.Input((t, d)), layer, keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", jit_compile=args.jit)
        for _ in range(3):  # trace, compile, warm up
            model.train_on_batch(x, y)
        models[name] = model

    samples = {name: [] for name in models}
    names = list(models)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                models[name].train_on_batch(x, y)
            samples[name].append(args.steps * b / (time.perf_counter() - start))

    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}; native kernel: {native_available(jit_compile=args.jit)}"
    )
    print(
        f"train_on_batch at (B, T, D, H) = ({b}, {t}, {d}, {h}), "
        f"jit_compile={args.jit}; median of {args.rounds} interleaved rounds of "
        f"{args.steps} steps\n"
    )
    plain = statistics.median(samples["GatedLSTM(H)"]) if "GatedLSTM(H)" in samples else None
    print("| layer | train seq/s | cost vs GatedLSTM(H) |")
    print("| --- | ---: | ---: |")
    for name in names:
        rate = statistics.median(samples[name])
        cost = f"{plain / rate:.2f}x" if plain else "n/a"
        print(f"| `{name}` | {rate:,.0f} | {cost} |")


if __name__ == "__main__":
    main()

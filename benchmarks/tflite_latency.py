"""Latency of one forecast: TFLite interpreter against the SavedModel signatures.

The model is the demo's shape: 24 hourly steps of 3 features, a GatedLSTM
and a Dense head. Each runtime gets the same input; every call is timed on
its own after a warm-up, and the median and 90th percentile are printed in
microseconds, with the largest difference from Keras's output.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/tflite_latency.py \
        [--units 32] [--timesteps 24] [--batch 1] [--repeats 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from benchmarks.serving import cpu_name
from keras_lstm import GatedLSTM, export_for_serving, export_tflite


def timed(call, repeats, warmup=20):
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def tflite_runner(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    out = interpreter.get_output_details()[0]["index"]

    def call():
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    t, d = args.timesteps, 3
    model = keras.Sequential(
        [keras.Input((t, d), name="x"), GatedLSTM(args.units), keras.layers.Dense(1, name="y")]
    )
    x = np.random.default_rng(0).standard_normal((args.batch, t, d)).astype("float32")
    expected = model.predict(x, verbose=0)

    folder = tempfile.mkdtemp()
    unrolled = export_tflite(model, os.path.join(folder, "unrolled.tflite"), batch_size=args.batch)
    free = keras.Sequential(
        [keras.Input((None, d), name="x"), GatedLSTM(args.units), keras.layers.Dense(1, name="y")]
    )
    free.set_weights(model.get_weights())
    looped = export_tflite(free, os.path.join(folder, "loop.tflite"), batch_size=args.batch)
    xla = tf.saved_model.load(export_for_serving(model, os.path.join(folder, "xla")))
    plain = tf.saved_model.load(
        export_for_serving(model, os.path.join(folder, "plain"), jit_compile=False)
    )

    x_tf = tf.constant(x)
    steps = [tf.constant(x[:, i]) for i in range(t)]

    def saved_model(loaded):
        signature = loaded.signatures["serving_default"]
        return lambda: signature(x=x_tf)["y"].numpy()

    def stream(loaded):
        step, initial = loaded.signatures["step"], loaded.signatures["initial_state"]
        zeros = initial(batch_size=tf.constant(args.batch))

        def one_step():
            return step(x=steps[-1], **zeros)["y"].numpy()

        def whole():
            states = zeros
            for xt in steps:
                out = step(x=xt, **states)
                states = {k: out[k] for k in zeros}
            return out["y"].numpy()

        return one_step, whole

    runs = {
        "TFLite, unrolled (builtin ops)": tflite_runner(unrolled, x),
        "TFLite, WHILE loop (builtin ops)": tflite_runner(looped, x),
        "SavedModel serving_default, XLA": saved_model(xla),
        "SavedModel serving_default, no XLA": saved_model(plain),
    }
    one_step, whole = stream(xla)
    runs[f"SavedModel step x{t} (client-held state), XLA"] = whole
    runs["SavedModel step, one step, XLA"] = one_step

    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}")
    print(
        f"Model: GatedLSTM({args.units}) + Dense(1), batch {args.batch}, {t} steps of {d} "
        f"features; {args.repeats} timed calls each, after 20 warm-up calls\n"
    )
    print("| runtime | median (µs) | p90 (µs) | max abs diff vs Keras |")
    print("| --- | ---: | ---: | ---: |")
    for name, call in runs.items():
        diff = float(np.abs(call() - expected).max()) if "one step" not in name else float("nan")
        median, p90 = timed(call, args.repeats)
        shown = "n/a" if np.isnan(diff) else f"{diff:.1e}"
        print(f"| {name} | {median:,.0f} | {p90:,.0f} | {shown} |")


if __name__ == "__main__":
    main()

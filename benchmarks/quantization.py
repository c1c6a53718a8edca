"""Quantized TFLite models of the demo's forecaster: size, accuracy and latency.

Trains the demo's model (`GatedLSTM(32)` + `Dense(1)` on the last 24 hours of
Seattle's 2010 temperatures, `keras_lstm.demo`) once, exports it with
`export_tflite` as float32 and with each `quantize=` mode (calibrated on 300
training windows), unrolled and as the fused op (`fused=True`), and runs
every file in LiteRT's interpreter
(`ai_edge_litert`): the next-hour test MAE in °F over the whole test split,
next to Keras's own, and the latency of one forecast at batch 1 (rounds of
calls, the files taking turns, median and p99 in microseconds; each call
resets the interpreter's variables first, which the fused op needs).

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python -m benchmarks.quantization \\
        [--epochs 8] [--rounds 20] [--calls 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

MODES = [None, "dynamic", "int8", "int16x8"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()

    from ai_edge_litert.interpreter import Interpreter

    from benchmarks.serving import cpu_name
    from keras_lstm import GatedLSTM, demo, export_tflite
    from keras_lstm.datasets import seattle_hourly_temperatures

    times, temps = seattle_hourly_temperatures()
    train, val, test, scale = demo.make_windows(times, temps)
    model = demo.build_model(GatedLSTM(args.units))
    start = time.perf_counter()
    demo._fit(model, train, val, args.epochs, verbose=0, seed=0)
    trained = time.perf_counter() - start
    keras_mae = demo._mae(model, test, scale)

    folder = tempfile.mkdtemp(prefix="keras-lstm-quantization-")
    calibration = train.x[np.random.default_rng(0).permutation(len(train.x))[:300]]
    rows = {}
    for mode, fused in [(mode, fused) for mode in MODES for fused in (True, False)]:
        name = f"{mode or 'float32'}, {'fused op' if fused else 'unrolled'}"
        try:
            path = export_tflite(
                model,
                os.path.join(folder, f"{name}.tflite"),
                quantize=mode,
                representative_data=calibration if mode in ("int8", "int16x8") else None,
                fused=fused,
            )
        except Exception as error:
            print(f"{name}: {str(error).splitlines()[0][:200]}")
            continue
        interpreter = Interpreter(model_path=path)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        out = interpreter.get_output_details()[0]["index"]
        change = []
        for window in test.x:
            interpreter.reset_all_variables()  # the fused op keeps h and c between calls
            interpreter.set_tensor(index, window[None])
            interpreter.invoke()
            change.append(interpreter.get_tensor(out)[0, 0])
        forecast = test.last + np.array(change) * scale["delta_std"]
        mae = float(np.mean(np.abs(forecast - test.truth)))
        rows[name] = {"path": path, "mae": mae, "interpreter": interpreter, "samples": []}

    x = test.x[:1]
    for _ in range(args.rounds):
        for row in rows.values():
            interpreter = row["interpreter"]
            index = interpreter.get_input_details()[0]["index"]
            for _ in range(args.calls):
                begin = time.perf_counter()
                interpreter.reset_all_variables()
                interpreter.set_tensor(index, x)
                interpreter.invoke()
                row["samples"].append((time.perf_counter() - begin) * 1e6)

    import tensorflow as tf

    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}")
    print(
        f"Model: the demo's GatedLSTM({args.units}) + Dense(1), 24 hours x 3 features, "
        f"trained {args.epochs} epochs ({trained:.0f} s); test split {len(test.x)} windows; "
        f"Keras's own test MAE {keras_mae:.3f} °F; latency: {args.rounds} rounds of "
        f"{args.calls} calls per file at batch 1, interleaved, µs\n"
    )
    print("| model | size (KB) | test MAE (°F) | median | p99 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        samples = sorted(row["samples"])
        median = samples[len(samples) // 2]
        p99 = samples[int(0.99 * (len(samples) - 1))]
        size = os.path.getsize(row["path"]) / 1024
        print(f"| {name} | {size:,.0f} | {row['mae']:.3f} | {median:,.0f} | {p99:,.0f} |")


if __name__ == "__main__":
    main()

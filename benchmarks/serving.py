"""Serving latency: each export loaded as a server loads it, timed in rounds.

Every runtime runs in its own worker process that imports neither keras nor
keras_lstm (both are blocked in `sys.modules`), as TensorFlow Serving,
LiteRT or onnxruntime would hold the model. The parent sends the workers
blocks of calls in turn, round after round, so that all of them see the same
machine load; it reports the median and the 99th percentile of single calls,
in microseconds, at batch 1 and 64, and each export's largest difference
from Keras's `predict`.

Rows: our SavedModel from `export_for_serving` (with and without XLA) and
its streaming `step` signature (one step, client-held state); the same model
built with `keras.layers.LSTM` (same weights) exported with Keras's own
`model.export()`; our TFLite files (`export_tflite`: float, int8 calibrated
on random inputs, and the fused op, reset before each call); our ONNX export
(`model.export(format="onnx")`, ONNX's `LSTM` op) next to the `Loop` form and
to `torch.onnx` of the same `torch.nn.LSTM` (from `keras_lstm.to_torch`).

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python -m benchmarks.serving \\
        [--units 32] [--timesteps 24] [--features 3] [--rounds 10] [--calls 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.modules["keras"] = None  # as on a server: no Keras,
    sys.modules["keras_lstm"] = None  # and none of our code
    import numpy as np

    kind, path, x_path = sys.argv[1:4]
    x = np.load(x_path)
    if kind == "saved_model":
        import tensorflow as tf
        loaded = tf.saved_model.load(path)  # kept: the signature needs its variables
        signature = loaded.signatures["serving_default"]
        name = list(signature.structured_input_signature[1])[0]
        x_tf = tf.constant(x)
        def call():
            return next(iter(signature(**{name: x_tf}).values())).numpy()
    elif kind == "keras_export":
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        serve = loaded.serve
        x_tf = tf.constant(x)
        def call():
            return serve(x_tf).numpy()
    elif kind == "step":
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        step, initial = loaded.signatures["step"], loaded.signatures["initial_state"]
        states = initial(batch_size=tf.constant(x.shape[0]))
        x_t = tf.constant(x[:, -1])
        def call():
            return step(x=x_t, **states)["y"].numpy()
    elif kind in ("tflite", "tflite_fused"):
        from ai_edge_litert.interpreter import Interpreter
        interpreter = Interpreter(model_path=path)
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, x.shape)
        interpreter.allocate_tensors()
        out = interpreter.get_output_details()[0]["index"]
        fused = kind == "tflite_fused"
        def call():
            if fused:  # the fused op keeps its states between calls
                interpreter.reset_all_variables()
            interpreter.set_tensor(index, x)
            interpreter.invoke()
            return interpreter.get_tensor(out)
    elif kind == "onnx":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        def call():
            return session.run(None, feed)[0]
    else:
        raise SystemExit(f"unknown kind {kind}")

    result = call()
    for _ in range(20):
        call()
    print(json.dumps({"ready": True, "shape": list(result.shape)}), flush=True)
    np.save(x_path + f".{kind}.{os.getpid()}.out.npy", result)
    print(json.dumps({"out": x_path + f".{kind}.{os.getpid()}.out.npy"}), flush=True)
    for line in sys.stdin:
        n = int(line)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e6)
        print(json.dumps(samples), flush=True)
    """
)


class Worker:
    def __init__(self, kind, path, x_path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, path, x_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        ready = json.loads(self.process.stdout.readline())
        assert ready["ready"], ready
        self.output = np.load(json.loads(self.process.stdout.readline())["out"])
        self.samples = []

    def run(self, calls):
        self.process.stdin.write(f"{calls}\n")
        self.process.stdin.flush()
        self.samples += json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def export_all(args, folder):
    """Writes every export; returns `{row: (kind, path)}` and the models' `predict`."""
    import keras

    import keras_lstm
    from keras_lstm import GatedLSTM, export_for_serving, export_tflite
    from keras_lstm._routes import Route

    keras.utils.set_random_seed(0)
    shape = (args.timesteps, args.features)

    def model(layer):
        return keras.Sequential(
            [keras.Input(shape, name="x"), layer, keras.layers.Dense(1, name="y")]
        )

    ours = model(GatedLSTM(args.units))
    theirs = model(keras.layers.LSTM(args.units))
    theirs.set_weights(ours.get_weights())
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows["ours: SavedModel, XLA"] = (
            "saved_model",
            export_for_serving(ours, os.path.join(folder, "xla"), streaming=True),
        )
        rows["ours: SavedModel, no XLA"] = (
            "saved_model",
            export_for_serving(ours, os.path.join(folder, "plain"), jit_compile=False),
        )
        rows["ours: SavedModel step (one step), XLA"] = ("step", rows["ours: SavedModel, XLA"][1])
        path = os.path.join(folder, "keras_lstm")
        theirs.export(path, format="tf_saved_model", verbose=False)
        rows["keras.layers.LSTM: model.export()"] = ("keras_export", path)
        calibration = np.random.default_rng(0).standard_normal((200, *shape)).astype("float32")
        for batch in args.batches:
            path = export_tflite(
                ours, os.path.join(folder, f"ours_{batch}.tflite"), batch_size=batch
            )
            rows[f"ours: TFLite float (export_tflite), batch {batch}"] = ("tflite", path)
            path = export_tflite(
                ours,
                os.path.join(folder, f"ours_int8_{batch}.tflite"),
                batch_size=batch,
                quantize="int8",
                representative_data=calibration,
            )
            rows[f"ours: TFLite int8, batch {batch}"] = ("tflite", path)
            path = export_tflite(
                ours,
                os.path.join(folder, f"ours_fused_{batch}.tflite"),
                batch_size=batch,
                fused=True,
            )
            rows[f"ours: TFLite fused op (fused=True), batch {batch}"] = ("tflite_fused", path)
        path = os.path.join(folder, "ours_lstm_op.onnx")
        ours.export(path, format="onnx", verbose=False)
        rows["ours: ONNX (LSTM op)"] = ("onnx", path)
        # The Loop form, as a masked layer or a cell option would export.
        path = os.path.join(folder, "ours_loop.onnx")
        _pin(ours, Route.NO_TENSOR_LISTS)
        try:
            ours.export(path, format="onnx", verbose=False)
        finally:
            _pin(ours, None)
        rows["ours: ONNX (Loop)"] = ("onnx", path)
        rows["torch.nn.LSTM: torch.onnx (LSTM op)"] = (
            "onnx",
            _torch_onnx(ours, keras_lstm, folder),
        )
    return rows, ours


def _pin(model, route):
    """Every GatedLSTM of `model` takes `route` (`None`: the one the routes pick)."""
    for layer in model.layers:
        if hasattr(layer, "_runs_routes"):
            layer._pinned_route = route


def _torch_onnx(model, keras_lstm, folder):
    import torch

    lstm = keras_lstm.to_torch(model.layers[0])
    dense = model.layers[1]
    head = torch.nn.Linear(dense.kernel.shape[0], 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(dense.kernel).T))
        head.bias.copy_(torch.from_numpy(np.asarray(dense.bias)))

    class Forecaster(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = lstm, head

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    path = os.path.join(folder, "torch.onnx")
    x = torch.zeros((1, *model.input_shape[1:]))
    torch.onnx.export(
        Forecaster().eval(),
        (x,),
        path,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=24)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50, help="calls per worker per round")
    args = parser.parse_args()

    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="keras-lstm-serving-")
    rows, model = export_all(args, folder)
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}")
    print(
        f"Model: GatedLSTM({args.units}) + Dense(1), {args.timesteps} steps of "
        f"{args.features} features; {args.rounds} rounds of {args.calls} calls per runtime, "
        "interleaved, after 20 warm-up calls; microseconds per call\n"
    )
    print("| runtime | batch | median | p99 | max abs diff vs predict |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        x = (
            np.random.default_rng(batch)
            .standard_normal((batch, args.timesteps, args.features))
            .astype("float32")
        )
        expected = model.predict(x, verbose=0)
        x_path = os.path.join(folder, f"x{batch}.npy")
        np.save(x_path, x)
        workers = {}
        for name, (kind, path) in rows.items():
            if kind.startswith("tflite") and not name.endswith(f"batch {batch}"):
                continue
            workers[name] = Worker(kind, path, x_path)
        for _ in range(args.rounds):
            for worker in workers.values():
                worker.run(args.calls)
        for name, worker in workers.items():
            worker.close()
            samples = sorted(worker.samples)
            median = samples[len(samples) // 2]
            p99 = samples[int(0.99 * (len(samples) - 1))]
            diff = "n/a" if "step" in name else f"{np.abs(worker.output - expected).max():.1e}"
            if "int8" in name:  # calibrated on random inputs: accuracy is measured elsewhere
                diff = f"({diff})"
            shown = name.replace(f", batch {batch}", "")
            print(f"| {shown} | {batch} | {median:,.0f} | {p99:,.0f} | {diff} |")


if __name__ == "__main__":
    main()

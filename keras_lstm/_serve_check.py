"""Load a TensorFlow Serving export the way a model server does, and call it.

This file imports TensorFlow and NumPy only (never Keras or keras_lstm), so
that it proves an export stands on its own. `keras-lstm serve-check` runs it
in a fresh Python process (`launch`) where importing `keras` or `keras_lstm`
raises ImportError; it can also be run directly:
`python keras_lstm/_serve_check.py BASE_DIR`.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Installed first in the checking process: any import of these names fails,
# as it would in a server that has TensorFlow and no Keras.
BLOCKER = """
import importlib.machinery, sys
class _NoKeras:
    # A spec without an origin: probes such as importlib.util.find_spec see no
    # package to read, and an actual import fails in create_module.
    blocked = ("keras", "keras_lstm", "tf_keras")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ImportError(f"`{spec.name}` is not importable here: a model server has no Keras")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _NoKeras())
"""

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def launch(base_dir: str) -> int:
    """Run `check(base_dir)` in a fresh process without Keras; return its exit code."""
    newest_version(base_dir)  # a missing or empty folder fails here, before TensorFlow starts
    code = BLOCKER + (
        f"import runpy\nrunpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')\n"
    )
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.call([sys.executable, "-I", "-c", code, os.fspath(base_dir)], env=env)


def newest_version(base_dir: str) -> str:
    """The path of the highest numbered version folder in `base_dir`."""
    if not os.path.isdir(base_dir):
        raise ValueError(f"`{base_dir}` is not a folder.")
    versions = [int(name) for name in os.listdir(base_dir) if name.isdigit()]
    if not versions:
        raise ValueError(f"`{base_dir}` holds no numbered version folder.")
    return os.path.join(base_dir, str(max(versions)))


def _describe(spec) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in spec.shape.as_list())
    return f"{spec.dtype.name}[{dims}]"


def random_inputs(signature, batch_size: int, timesteps: int, seed: int = 0) -> dict:
    """Random arguments for `signature`: free batch and time axes filled in."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in signature.structured_input_signature[1].items():
        if spec.shape.rank == 0:
            inputs[name] = tf.constant(batch_size, spec.dtype)  # initial_state's batch_size
            continue
        shape = [batch_size] + [timesteps if d is None else d for d in spec.shape.as_list()[1:]]
        if spec.dtype.is_floating:
            value = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        else:
            value = np.zeros(shape, spec.dtype.as_numpy_dtype)
        inputs[name] = tf.constant(value)
    return inputs


def replay_warmup(export_dir: str, loaded) -> int:
    """Call the export with each warmup request; return how many there were."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_FILE)
    count = 0
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        signature = loaded.signatures[request.model_spec.signature_name or "serving_default"]
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        signature(**inputs)
        count += 1
    return count


def check(base_dir: str) -> int:
    export_dir = newest_version(base_dir)
    import tensorflow as tf

    print(f"Loading {export_dir} with tf.saved_model.load")
    loaded = tf.saved_model.load(export_dir)
    for name, signature in sorted(loaded.signatures.items()):
        print(f"\nsignature {name!r}")
        for key, spec in sorted(signature.structured_input_signature[1].items()):
            print(f"  input  {key}: {_describe(spec)}")
        for key, spec in sorted(signature.structured_outputs.items()):
            print(f"  output {key}: {_describe(spec)}")
        outputs = signature(**random_inputs(signature, batch_size=2, timesteps=5))
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(outputs.items()))
        print(f"  ran on random inputs (batch 2, 5 time steps): {shapes}")
    if os.path.exists(os.path.join(export_dir, WARMUP_FILE)):
        print(f"\nwarmup: {replay_warmup(export_dir, loaded)} requests answered")
    else:
        print("\nwarmup: none")
    print("OK")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: _serve_check.py BASE_DIR")
    try:
        sys.exit(check(sys.argv[1]))
    except ValueError as error:
        raise SystemExit(f"serve-check: {error}") from None

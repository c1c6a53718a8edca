"""Data-parallel training of GatedLSTM ends where single-device training ends.

The single-device weights come from this process (TensorFlow); each
distributed set-up runs `tests/_distribution_checks.py` in fresh processes,
on 127.0.0.1 only, every process bounded by a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _distribution_checks as checks  # noqa: E402

import keras_lstm  # noqa: E402, F401  (registers GatedLSTM for load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "_distribution_checks.py")
TIMEOUT_S = 240
# Replicas sum their gradients in another order than one device does.
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the single-device reference is computed under the TensorFlow backend",
)


@pytest.fixture(scope="module")
def single_device_weights():
    keras.utils.set_random_seed(0)
    weights = checks.train()
    initial = checks.make_data()[2]
    assert max(np.abs(a - b).max() for a, b in zip(weights, initial, strict=True)) > 1e-2
    return weights


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run(processes):
    """Wait for every process; kill all of them if one fails or runs too long."""
    try:
        for process in processes:
            log, _ = process.communicate(timeout=TIMEOUT_S)
            assert process.returncode == 0, f"{process.args} failed:\n{log[-6000:]}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _assert_same_weights(path, reference, replicas_key="replicas", replicas=2):
    with np.load(path) as data:
        assert int(data[replicas_key]) == replicas
        diff = max(float(np.abs(data[f"weight_{i}"] - w).max()) for i, w in enumerate(reference))
    print(f"\n{os.path.basename(path)}: max abs diff to one device {diff:.2e}")
    assert diff <= TOLERANCE


def test_mirrored_strategy_on_two_cpus_matches_one_device(tmp_path, single_device_weights):
    out = tmp_path / "mirrored.npz"
    _run([_start(["mirrored", str(out)], _env())])
    _assert_same_weights(out, single_device_weights)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_with_two_local_workers_matches_one_device(
    tmp_path, single_device_weights
):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        out = str(tmp_path / f"worker{index}.npz")
        processes.append(_start(["worker", out], _env(TF_CONFIG=json.dumps(config))))
    _run(processes)
    for index in range(2):
        _assert_same_weights(tmp_path / f"worker{index}.npz", single_device_weights)


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (pip install 'keras-lstm[jax]')",
)
def test_jax_data_parallel_on_two_cpus_matches_one_device(tmp_path, single_device_weights):
    out = tmp_path / "jax.npz"
    env = _env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _run([_start(["jax", str(out)], env)])
    _assert_same_weights(out, single_device_weights, replicas_key="devices")
    with np.load(out) as data:
        single_jax = [data[f"single_{i}"] for i in range(len(single_device_weights))]
    # JAX on one device agrees with TensorFlow on one device, too.
    for got, want in zip(single_jax, single_device_weights, strict=True):
        np.testing.assert_allclose(got, want, atol=TOLERANCE)


EXAMPLES = {
    "tf_mirrored": ["distributed_tf.py", "--strategy", "mirrored"],
    "tf_multi_worker": ["distributed_tf.py", "--strategy", "multi-worker", "--workers", "2"],
    "jax_data_parallel": ["distributed_jax.py", "--cpu-devices", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_distributed_example_trains_and_saves_a_loadable_model(name, tmp_path):
    script, *args = EXAMPLES[name]
    if script.endswith("_jax.py") and importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'keras-lstm[jax]')")
    out = tmp_path / "model.keras"
    command = [sys.executable, os.path.join(ROOT, "examples", script), *args]
    command += ["--epochs", "1", "--units", "4", "--timeout", "200", "--out", str(out)]
    if script.endswith("_jax.py"):
        command.remove("--timeout")
        command.remove("200")
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "validation loss" in result.stdout
    model = keras.saving.load_model(out)
    assert type(model.get_layer("gated_lstm")).__name__ == "GatedLSTM"
    assert np.all(np.isfinite(model.predict(np.zeros((2, 24, 3), "float32"), verbose=0)))

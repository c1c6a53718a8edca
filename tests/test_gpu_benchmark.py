"""`benchmarks/gpu.py --dry-run`: the GPU benchmark's code path runs at a tiny size.

The script runs under the JAX backend in its own process (KERAS_BACKEND is read
when keras is imported), on the CPU where there is no GPU.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (pip install 'keras-lstm[jax]')",
)
def test_gpu_benchmark_dry_run_prints_parity_and_table():
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "parity: ok" in out, out
    assert "| shape (B,T,D,H) | mode | contender | route | median ms |" in out, out
    for name in ("GatedLSTM", "GatedLSTM(peephole=True)", "keras.layers.LSTM"):
        for mode in ("inference", "training"):
            assert f"| 2x5x3x4 | {mode} | {name} |" in out, out

"""Keras's own export tests, run with their LSTM models switched to GatedLSTM.

The test modules ship inside the installed `keras` package
(`keras/src/export/*_test.py`). Each is run twice in a subprocess, on copies:
once as Keras wrote it and once with `layers.LSTM(` replaced by our
`GatedLSTM(`, keeping only the tests whose name says LSTM. In both copies
the skips Keras added for its LSTM model are lifted, the LiteRT module's
LSTM model (defined, but not in its list of model types) is added, and
OpenVINO is asked for float32 arithmetic, so each copy runs the same tests.
Every test that passes for `keras.layers.LSTM` must pass for ours. Slow:
about a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import keras
import pytest

from keras_lstm.kernels import native_available

pytestmark = pytest.mark.slow

EXPORT_TESTS = Path(keras.__file__).parent / "src" / "export"
# The module, and the package the export it tests needs.
MODULES = {"onnx_test": "tf2onnx", "litert_test": "ai_edge_litert", "openvino_test": "openvino"}


def _prepare(source: str) -> str:
    # `self.skipTest("... LSTM ...")`, however Keras wraps the line.
    source = re.sub(r"self\.skipTest\(\s*\"[^\"]*LSTM[^\"]*\"\s*\)", "pass", source)
    # OpenVINO computes in bfloat16 on CPUs that have it (this one does) unless
    # told otherwise; the tests compare with float32 `predict` at 1e-3.
    source = source.replace(
        'core.compile_model(ov_model, "CPU")',
        'core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})',
    )
    return source.replace(
        'model_types = ["sequential", "functional"]',
        'model_types = ["sequential", "functional", "lstm"]',
    )


def _with_gated_lstm(source: str) -> str:
    assert "layers.LSTM(" in source
    return "from keras_lstm import GatedLSTM\n" + source.replace("layers.LSTM(", "GatedLSTM(")


def _run(module: str, source: str, folder: Path) -> dict[str, str]:
    folder.mkdir()
    (folder / f"{module}.py").write_text(source)
    report = folder / "report.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "lstm",
            f"--junitxml={report}",
            "-o",
            "addopts=",
            str(folder / f"{module}.py"),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        message = next((child.get("message", "") for child in case), "")
        outcomes[case.get("name")] = f"{outcome}: {message[:300]}" if message else outcome
    return outcomes


@pytest.mark.parametrize("module", sorted(MODULES))
def test_keras_export_tests_that_pass_for_keras_lstm_pass_for_gated_lstm(module, tmp_path):
    pytest.importorskip(
        MODULES[module], reason=f"{module} needs {MODULES[module]} (the test extra)"
    )
    if not native_available():
        pytest.skip("the native kernel is not built here: the tests would not cover it")
    source = _prepare((EXPORT_TESTS / f"{module}.py").read_text())
    theirs = _run(module, source, tmp_path / "keras")
    ours = _run(module, _with_gated_lstm(source), tmp_path / "ours")
    assert ours, f"no LSTM test ran in {module}"
    assert set(ours) == set(theirs)
    regressions = {
        name: outcome
        for name, outcome in ours.items()
        if theirs[name] == "passed" and outcome != "passed"
    }
    assert not regressions, regressions
    assert any(outcome == "passed" for outcome in ours.values()), ours
    print(module, {name: (theirs[name], ours[name]) for name in sorted(ours)})

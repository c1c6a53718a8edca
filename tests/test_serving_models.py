"""More model shapes through `export_for_serving`, and the `export` / `serve-check` commands.

Slow: each export traces and compiles its signatures; all loads share one
fresh process in which Keras cannot be imported.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from test_serving import make_case, run_without_keras, sequences

from keras_lstm import GatedLSTM, GatedLSTMCell, export_for_serving

pytestmark = pytest.mark.slow

SHAPES = [(1, 3), (4, 6)]


def single():
    return keras.Sequential([keras.Input((None, 3), name="x"), GatedLSTM(6), keras.layers.Dense(1)])


def stacked_per_step():
    return keras.Sequential(
        [
            keras.Input((None, 3), name="x"),
            GatedLSTM(5, return_sequences=True),
            keras.layers.RNN(GatedLSTMCell(4), return_sequences=True),
            GatedLSTM(3, return_sequences=True),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )


def masked():
    return keras.Sequential(
        [
            keras.Input((None, 3), name="x"),
            keras.layers.Masking(),
            GatedLSTM(4),
            keras.layers.Dense(1),
        ]
    )


def bidirectional():
    return keras.Sequential(
        [
            keras.Input((None, 3), name="x"),
            keras.layers.Bidirectional(GatedLSTM(4)),
            keras.layers.Dense(1),
        ]
    )


def fixed_length():
    """Built for 6 steps: `step` runs it one step at a time all the same."""
    return keras.Sequential(
        [
            keras.Input((6, 3), name="x"),
            GatedLSTM(4, return_sequences=True),
            GatedLSTM(3),
            keras.layers.Dense(1),
        ]
    )


def keras_lstm_layers():
    return keras.Sequential(
        [
            keras.Input((None, 3), name="x"),
            keras.layers.LSTM(4, return_sequences=True),
            keras.layers.GRU(3),
            keras.layers.Dense(1),
        ]
    )


def test_model_shapes_export_and_load_without_keras(tmp_path):
    keras.utils.set_random_seed(11)
    builders = {
        "single": single,
        "stacked_per_step": stacked_per_step,
        "masked": masked,
        "bidirectional": bidirectional,
        "keras_lstm_gru": keras_lstm_layers,
        "fixed_length": fixed_length,
    }
    cases = []
    for tag, build in builders.items():
        model = build()
        export_dir = export_for_serving(model, tmp_path / tag)
        shapes = [(1, 6), (4, 6)] if tag == "fixed_length" else SHAPES
        batches = sequences(shapes, 3, masked=tag == "masked")
        cases.append(make_case(model, export_dir, str(tmp_path), batches, tag))
    report = run_without_keras(cases, str(tmp_path))
    assert report["keras_blocked"]
    results = dict(zip(builders, report["cases"], strict=True))
    for tag, result in results.items():
        streams = tag != "bidirectional"
        expected = ["initial_state", "serving_default", "step"] if streams else ["serving_default"]
        assert result["signatures"] == expected, tag
        for errors in result["whole"] + result["step"]:
            assert max(errors.values()) < 1e-5, (tag, errors)
        assert len(result["step"]) == (len(SHAPES) if streams else 0)
        assert all(finite for _, _, finite in result["warmup"])


def test_stateful_model_is_served_stateless_with_the_same_weights(tmp_path):
    keras.utils.set_random_seed(5)
    stateful = keras.Sequential(
        [
            keras.Input(batch_shape=(2, 5, 3), name="x"),
            GatedLSTM(4, stateful=True),
            keras.layers.Dense(1, name="y"),
        ]
    )
    # An independent reference: keras.layers.LSTM, stateless, the same weights.
    reference = keras.Sequential(
        [keras.Input((None, 3), name="x"), keras.layers.LSTM(4), keras.layers.Dense(1, name="y")]
    )
    reference.set_weights(stateful.get_weights())
    stateful.predict(np.ones((2, 5, 3), "float32"), verbose=0)  # leaves a carried state
    with pytest.warns(UserWarning, match="stateful; the export serves a copy with stateful=False"):
        export_dir = export_for_serving(stateful, tmp_path / "m")
    case = make_case(reference, export_dir, str(tmp_path), sequences([(3, 4), (1, 7)], 3), "sf")
    result = run_without_keras([case], str(tmp_path))["cases"][0]
    assert result["signatures"] == ["initial_state", "serving_default", "step"]
    for errors in result["whole"] + result["step"]:
        assert max(errors.values()) < 1e-5, errors


def run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "keras_lstm.cli", *args], capture_output=True, text=True, env=env
    )


def test_cli_export_then_serve_check_prints_each_signature(tmp_path):
    model = masked()
    model.save(tmp_path / "model.keras")
    base_dir = tmp_path / "serving"
    first = run_cli("export", str(tmp_path / "model.keras"), str(base_dir), "--no-jit")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip().endswith(os.path.join("serving", "1"))
    second = run_cli(
        "export", str(tmp_path / "model.keras"), str(base_dir), "--version", "5", "--no-streaming"
    )
    assert second.returncode == 0, second.stderr[-2000:]
    again = run_cli("export", str(tmp_path / "model.keras"), str(base_dir), "--version", "5")
    assert again.returncode != 0 and "Version 5 already exists" in again.stderr

    checked = run_cli("serve-check", str(base_dir))
    assert checked.returncode == 0, checked.stderr[-2000:]
    out = checked.stdout
    assert os.path.join("serving", "5") in out  # the newest version
    assert "signature 'serving_default'" in out and "signature 'step'" not in out
    assert "input  x: float32[None, None, 3]" in out
    assert "output dense: float32[None, 1]" in out
    assert "warmup: 2 requests answered" in out and out.strip().endswith("OK")

    os.rename(base_dir / "5", base_dir / ".old")
    checked = run_cli("serve-check", str(base_dir))
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "signature 'step'" in checked.stdout
    assert "input  gated_lstm_h: float32[None, 4]" in checked.stdout


def test_cli_export_without_jit_writes_no_xla_attribute(tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    model = single()
    model.save(tmp_path / "model.keras")
    done = run_cli("export", str(tmp_path / "model.keras"), str(tmp_path / "s"), "--no-jit")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "s" / "1" / "saved_model.pb", "rb") as f:
        saved = saved_model_pb2.SavedModel.FromString(f.read())
    functions = saved.meta_graphs[0].graph_def.library.function
    assert functions and not any(fn.attr["_XlaMustCompile"].b for fn in functions)

"""Keras's own `model.export(path, format=...)` with GatedLSTM: no format holds the native
op, and each export runs in its own runtime (TensorFlow without keras_lstm, LiteRT's
interpreter, onnxruntime, OpenVINO) and matches `predict`.

The default suite exports the model users reported (two stacked Bidirectional
layers) in each format; the slow suite adds the other model shapes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, GatedLSTMCell, _routes
from keras_lstm.kernels import native_available

T, D = 7, 3


def _stacked_bidirectional():
    return keras.Sequential(
        [
            keras.Input((T, D)),
            keras.layers.Bidirectional(GatedLSTM(10, return_sequences=True)),
            keras.layers.Bidirectional(GatedLSTM(10, return_sequences=True)),
            keras.layers.Dense(1),
        ]
    )


def _sequential():
    return keras.Sequential([keras.Input((T, D)), GatedLSTM(8), keras.layers.Dense(2)])


def _functional_cell():
    inputs = keras.Input((T, D))
    sequence, h, c = keras.layers.RNN(GatedLSTMCell(6), return_sequences=True, return_state=True)(
        inputs
    )
    outputs = keras.layers.Dense(1)(keras.layers.Concatenate()([h, c]))
    return keras.Model(inputs, outputs)


def _stacked():
    return keras.Sequential(
        [
            keras.Input((T, D)),
            GatedLSTM(8, return_sequences=True),
            GatedLSTM(4, go_backwards=True),
            keras.layers.Dense(1),
        ]
    )


def _masked():
    return keras.Sequential(
        [
            keras.Input((T, D)),
            keras.layers.Masking(0.0),
            GatedLSTM(6, return_sequences=True),
            keras.layers.Dense(1),
        ]
    )


def _cell_option():
    # Runs Keras's step loop around the cell, not the fused op.
    return keras.Sequential(
        [
            keras.Input((T, D)),
            GatedLSTM(5, peephole=True, return_sequences=True),
            keras.layers.Dense(1),
        ]
    )


def _free_length():
    return keras.Sequential(
        [
            keras.Input((None, D)),
            keras.layers.Bidirectional(GatedLSTM(5, return_sequences=True)),
            GatedLSTM(4),
            keras.layers.Dense(1),
        ]
    )


SHAPES = {
    "stacked_bidirectional": _stacked_bidirectional,
    "sequential": _sequential,
    "functional_cell": _functional_cell,
    "stacked": _stacked,
    "masked": _masked,
    "cell_option": _cell_option,
    "free_length": _free_length,
}
DEFAULT = ["stacked_bidirectional"]
SLOW = [name for name in SHAPES if name not in DEFAULT]
CASES = [pytest.param(name) for name in DEFAULT] + [
    pytest.param(name, marks=pytest.mark.slow) for name in SLOW
]


def _data():
    x = np.random.default_rng(0).normal(size=(4, T, D)).astype("float32")
    x[1, 5:] = 0.0  # padding, for the masked model
    return x


@pytest.fixture(scope="module", autouse=True)
def _native_kernel_is_active():
    # The leak these tests guard against needs the native kernel to be there.
    if not native_available():
        pytest.skip("the native kernel is not built here: nothing could leak")


UNPATCHED = textwrap.dedent(
    """
    import importlib, inspect, pkgutil
    import keras
    import keras.src.export as export

    def functions():
        found = {}
        modules = [export] + [
            importlib.import_module(f"keras.src.export.{m.name}")
            for m in pkgutil.iter_modules(export.__path__)
        ]
        for module in modules:
            for name, value in vars(module).items():
                if callable(value):
                    found[f"{module.__name__}.{name}"] = value
        for cls in (keras.Model, keras.layers.RNN):
            for name in dir(cls):
                found[f"{cls.__name__}.{name}"] = inspect.getattr_static(cls, name)
        return found

    before = functions()
    import keras_lstm
    keras_lstm.GatedLSTM(3)(keras.ops.zeros((2, 4, 3)))  # a call, too, leaves them
    after = functions()
    changed = sorted(n for n in before if after.get(n) is not before[n])
    print(len(before), "checked; changed:", changed)
    assert len(before) > 300 and not changed
    """
)


def test_import_keras_lstm_leaves_keras_unchanged():
    # Keras's exporters, keras.Model's and keras.layers.RNN's methods: the same
    # objects before and after `import keras_lstm` (a fresh process, so no
    # earlier import of ours counts).
    run = subprocess.run(
        [sys.executable, "-c", UNPATCHED], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "changed: []" in run.stdout


def test_keras_rnn_around_the_cell_calls_the_one_hook(monkeypatch):
    # The one hook into Keras (docs/serving.md): `keras.layers.RNN.call` runs the
    # recurrence through the layer's `inner_loop`, which `GatedLSTMCell.build` makes
    # ask the routes. If Keras stops calling it, this fails (and so would the LiteRT
    # and OpenVINO exports of keras.layers.RNN(GatedLSTMCell)).
    asked = []
    decide = _routes.decide
    monkeypatch.setattr(_routes, "decide", lambda *a: asked.append(a[0]) or decide(*a))
    rnn = keras.layers.RNN(GatedLSTMCell(4))
    rnn(np.zeros((2, T, D), "float32"))
    assert getattr(vars(rnn).get("inner_loop"), "keras_lstm_routes", False)
    assert asked == [rnn]
    assert "inner_loop" not in vars(keras.layers.RNN(keras.layers.LSTMCell(4)))


# The models whose every recurrent layer becomes ONNX's LSTM op (tf2onnx fuses
# GatedLSTM's export loop); the others keep an ONNX Loop and say why.
ONNX_LSTM_OP = {"stacked_bidirectional", "sequential", "stacked", "masked", "free_length"}
ONNX_LOOP_REASONS = {
    "functional_cell": "keras.layers.RNN runs Keras's step loop",
    "cell_option": r"its cell \(peephole\) is not the maths",
}


@pytest.mark.parametrize("shape", CASES)
def test_onnx_export_runs_in_onnxruntime_and_matches_predict(shape, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs the `onnx` extra")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export needs the `onnx` extra")
    model, x = SHAPES[shape](), _data()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.export(str(path), format="onnx", verbose=False)
    said = [str(w.message) for w in caught if "exports as an ONNX Loop" in str(w.message)]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not any(op.startswith("KerasLstm") for op in ops), ops
    if shape in ONNX_LSTM_OP:
        assert "LSTM" in ops and "Loop" not in ops, ops
        assert not said, said
    else:
        assert "Loop" in ops, ops
        assert said and re.search(ONNX_LOOP_REASONS[shape], said[0]), said
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_masked_onnx_export_is_the_lstm_op_with_lengths_for_every_mask(tmp_path):
    # Right and left padding, holes and a row with no kept step, through a
    # Bidirectional layer and a go_backwards one: each GatedLSTM becomes ONNX's
    # LSTM op with sequence_lens, not a Loop, and onnxruntime matches predict.
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs the `onnx` extra")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export needs the `onnx` extra")
    model = keras.Sequential(
        [
            keras.Input((None, D)),
            keras.layers.Masking(0.0),
            keras.layers.Bidirectional(GatedLSTM(6, return_sequences=True)),
            GatedLSTM(5, return_sequences=True, go_backwards=True),
            keras.layers.Dense(1),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 9, D)).astype("float32")
    x[1, 5:] = x[2, :4] = x[3, 2] = x[3, 6:8] = x[4] = 0.0
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer says it stays a Loop
        model.export(str(path), format="onnx", verbose=False)
    graph = onnx.load(str(path)).graph
    lstms = [node for node in graph.node if node.op_type == "LSTM"]
    assert {node.op_type for node in graph.node}.isdisjoint({"Loop", "Scan"})
    assert len(lstms) >= 2 and all(node.input[4] for node in lstms)  # sequence_lens given
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shape", CASES)
def test_litert_export_runs_in_litert_interpreter_and_matches_predict(shape, tmp_path):
    # Builtin ops only: LiteRT's interpreter has no TensorFlow (Flex) ops, which
    # keras.layers.LSTM's own LiteRT export needs (its TensorList ops).
    interpreter = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="LiteRT's interpreter is the `litert` extra"
    )
    model, x = SHAPES[shape](), _data()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.tflite"
    model.export(str(path), format="litert", verbose=False)
    assert b"KerasLstm" not in path.read_bytes()
    runner = interpreter.Interpreter(model_path=str(path)).get_signature_runner()
    (name,) = runner.get_input_details()
    (got,) = runner(**{name: x}).values()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shape", CASES)
def test_openvino_export_runs_in_openvino_and_matches_predict(shape, tmp_path):
    ov = pytest.importorskip("openvino", reason="OpenVINO is the `openvino` extra")
    model, x = SHAPES[shape](), _data()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.xml"
    model.export(str(path), format="openvino", verbose=False)
    assert b"KerasLstm" not in path.read_bytes()
    # OpenVINO computes in bfloat16 on CPUs that have it unless asked for float32.
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(x)[0], expected, atol=1e-5)


def test_step_loop_over_a_free_length_warns_that_litert_keeps_tensorflow_ops(tmp_path):
    model = keras.Sequential(
        [keras.Input((None, D)), keras.layers.RNN(GatedLSTMCell(4), name="cell_loop")]
    )
    with pytest.warns(UserWarning, match="'cell_loop'.*LiteRT converter.*fixed length"):
        model.export(str(tmp_path / "model.tflite"), format="litert", verbose=False)


def test_export_leaves_the_layers_as_they_were(tmp_path):
    model = _cell_option()
    model.export(str(tmp_path / "model.tflite"), format="litert", verbose=False)
    (layer,) = [layer for layer in model.layers if isinstance(layer, GatedLSTM)]
    assert layer.unroll is False and "inner_loop" not in vars(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(_data(), verbose=0)


SERVE = textwrap.dedent(
    """
    import sys
    sys.modules["keras_lstm"] = None  # as on a server: our code cannot be imported
    sys.modules["keras"] = None
    import numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    out = loaded.serve(tf.constant(x))
    np.save(sys.argv[3], out.numpy())
    """
)


@pytest.mark.parametrize("shape", CASES)
def test_tf_saved_model_export_loads_without_keras_lstm_and_matches_predict(shape, tmp_path):
    model, x = SHAPES[shape](), _data()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "saved"
    model.export(str(path), format="tf_saved_model", verbose=False)
    for graph in path.rglob("*.pb"):
        assert b"KerasLstm" not in graph.read_bytes(), graph
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [sys.executable, "-c", SERVE, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)


def test_training_still_runs_the_native_kernel_after_an_export(tmp_path):
    # The export's portable tracing is scoped to the export.
    model = _sequential()
    model.predict(_data(), verbose=0)
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    graph = tf.function(lambda v: model(v)).get_concrete_function(
        tf.TensorSpec((None, T, D), tf.float32)
    )
    assert any(op.type == "KerasLstmSequence" for op in graph.graph.get_operations())

"""`export_tflite`: builtin-op TFLite models that match Keras within 1e-4."""

import os
import warnings

import keras
import numpy as np
import pytest

from keras_lstm import GatedLSTM, export_tflite


def interpreter(path):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter announces its successor
        return tf.lite.Interpreter(model_path=str(path))


def run(runner, x):
    details = runner.get_input_details()[0]
    runner.resize_tensor_input(details["index"], x.shape)
    runner.allocate_tensors()
    runner.set_tensor(details["index"], x)
    runner.invoke()
    return runner.get_tensor(runner.get_output_details()[0]["index"])


def op_names(runner):
    return {op["op_name"] for op in runner._get_ops_details()}


def test_fixed_length_model_unrolls_to_builtin_ops_and_matches_keras(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6, 3)),
            GatedLSTM(5, return_sequences=True),
            GatedLSTM(4),
            keras.layers.Dense(2),
        ]
    )
    path = export_tflite(model, tmp_path / "m.tflite")
    runner = interpreter(path)
    x = np.random.default_rng(0).standard_normal((1, 6, 3)).astype("float32")
    np.testing.assert_allclose(run(runner, x), model.predict(x, verbose=0), atol=1e-4)
    ops = op_names(runner)
    assert {"FULLY_CONNECTED", "LOGISTIC", "TANH"} <= ops
    assert "WHILE" not in ops and not any(op.startswith("Flex") for op in ops)
    assert list(runner.get_input_details()[0]["shape_signature"]) == [1, 6, 3]


def test_timesteps_that_contradict_the_model_are_refused(tmp_path):
    model = keras.Sequential([keras.Input((6, 3)), GatedLSTM(4)])
    with pytest.raises(ValueError, match="`timesteps` is 8, but the model was built for .*6"):
        export_tflite(model, tmp_path / "m.tflite", timesteps=8)


def test_free_batch_and_free_length_convert_to_builtins(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4), keras.layers.Dense(1)])
    path = export_tflite(model, tmp_path / "m.tflite", batch_size=None)
    runner = interpreter(path)
    assert "WHILE" in op_names(runner)
    assert not any(op.startswith("Flex") for op in op_names(runner))
    for shape in [(1, 9, 3), (5, 4, 3)]:
        x = np.random.default_rng(1).standard_normal(shape).astype("float32")
        np.testing.assert_allclose(run(runner, x), model.predict(x, verbose=0), atol=1e-5)


def test_step_loop_over_free_batch_and_free_length_needs_flex(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4, peephole=True)])
    with pytest.raises(ValueError, match="free batch size.*step loop.*allow_flex=True"):
        export_tflite(model, tmp_path / "m.tflite", batch_size=None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argument", ["timesteps", "batch_size"])
def test_sizes_must_be_positive_integers(tmp_path, argument):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4)])
    with pytest.raises(ValueError, match=f"`{argument}` must be a positive integer"):
        export_tflite(model, tmp_path / "m.tflite", **{argument: 0})


def test_path_that_is_a_folder_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4)])
    with pytest.raises(ValueError, match="`path` must be a file name"):
        export_tflite(model, tmp_path, timesteps=4)


@pytest.mark.slow
def test_free_length_keeps_a_builtin_while_loop_for_any_length(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.Masking(),
            GatedLSTM(4, return_sequences=True),
            keras.layers.Dense(1),
        ]
    )
    runner = interpreter(export_tflite(model, tmp_path / "m.tflite"))
    assert "WHILE" in op_names(runner)
    assert list(runner.get_input_details()[0]["shape_signature"]) == [1, -1, 3]
    rng = np.random.default_rng(1)
    for steps in (3, 9):
        x = rng.standard_normal((1, steps, 3)).astype("float32")
        x[0, -1] = 0.0
        np.testing.assert_allclose(run(runner, x), model.predict(x, verbose=0), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["masked_stacked", "bidirectional", "stateful"])
def test_unrolled_model_with_a_free_batch_matches_keras(tmp_path, kind):
    keras.utils.set_random_seed(2)
    if kind == "masked_stacked":
        layers = [keras.layers.Masking(), GatedLSTM(5, return_sequences=True), GatedLSTM(3)]
    elif kind == "bidirectional":
        layers = [keras.layers.Bidirectional(GatedLSTM(4))]
    else:
        layers = [GatedLSTM(4, stateful=True)]
    batch = 4 if kind == "stateful" else None
    model = keras.Sequential(
        [keras.Input(batch_shape=(batch, 7, 3)), *layers, keras.layers.Dense(2)]
    )
    reference = model
    if kind == "stateful":  # served stateless: compare with a stateless twin
        reference = keras.Sequential([keras.Input((7, 3)), GatedLSTM(4), keras.layers.Dense(2)])
        reference.set_weights(model.get_weights())
        with pytest.warns(UserWarning, match="stateful"):
            path = export_tflite(model, tmp_path / "m.tflite", batch_size=None)
    else:
        path = export_tflite(model, tmp_path / "m.tflite", batch_size=None)
    runner = interpreter(path)
    assert not any(op.startswith("Flex") for op in op_names(runner))
    x = np.random.default_rng(4).standard_normal((4, 7, 3)).astype("float32")
    x[1, -3:] = 0.0
    np.testing.assert_allclose(run(runner, x), reference.predict(x, verbose=0), atol=1e-4)


def test_masked_bidirectional_model_matches_keras(tmp_path):
    # The backward half reads padded steps first; its masked outputs must be zero.
    model = keras.Sequential(
        [
            keras.Input((6, 2)),
            keras.layers.Masking(0.0),
            keras.layers.Bidirectional(GatedLSTM(4, return_sequences=True)),
            keras.layers.Dense(1),
        ]
    )
    x = np.random.default_rng(0).standard_normal((1, 6, 2)).astype("float32")
    x[:, 4:] = 0.0
    path = export_tflite(model, tmp_path / "m.tflite")
    np.testing.assert_allclose(run(interpreter(path), x), model.predict(x, verbose=0), atol=1e-4)


def _litert_outputs(path, x):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path))
    index = runner.get_input_details()[0]["index"]
    runner.allocate_tensors()
    outputs = []
    for row in x:
        runner.set_tensor(index, row[None])
        runner.invoke()
        outputs.append(runner.get_tensor(runner.get_output_details()[0]["index"])[0])
    return np.array(outputs)


@pytest.mark.parametrize(
    "quantize, tolerance",
    [
        pytest.param("dynamic", 0.01, marks=pytest.mark.slow),
        ("int8", 0.05),
        pytest.param("int16x8", 0.03, marks=pytest.mark.slow),
    ],
)
def test_quantized_models_run_in_litert_close_to_keras(tmp_path, quantize, tolerance):
    pytest.importorskip("ai_edge_litert", reason="LiteRT's interpreter is the `litert` extra")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((12, 3)), GatedLSTM(16), keras.layers.Dense(1)])
    rng = np.random.default_rng(5)
    calibration = rng.standard_normal((200, 12, 3)).astype("float32")
    x = rng.standard_normal((20, 12, 3)).astype("float32")
    data = None if quantize == "dynamic" else calibration
    path = export_tflite(model, tmp_path / "q.tflite", quantize=quantize, representative_data=data)
    float_path = export_tflite(model, tmp_path / "f.tflite")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(_litert_outputs(path, x), expected, atol=tolerance)
    # Quantized weights: the file holds int8 tensors the float one does not.
    assert os.path.getsize(path) != os.path.getsize(float_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize": "int4"}, "`quantize` must be one of"),
        ({"quantize": "int8"}, "needs `representative_data`"),
        ({"quantize": "dynamic", "representative_data": np.zeros((4, 6, 3))}, "ignored"),
        ({"quantize": "int8", "representative_data": np.zeros((0, 6, 3))}, "non-empty"),
        (
            {"quantize": "int8", "representative_data": np.zeros((4, 6, 5))},
            r"`representative_data` for `\w+` has shape \(4, 6, 5\), but the model's input "
            r"`\w+` takes \(n, 6, 3\)",
        ),
        ({"quantize": "int8", "representative_data": np.zeros((4, 7, 3))}, "takes \\(n, 6, 3\\)"),
    ],
)
def test_quantize_arguments_are_checked_before_converting(tmp_path, kwargs, message):
    model = keras.Sequential([keras.Input((6, 3)), GatedLSTM(4)])
    with pytest.raises(ValueError, match=message):
        export_tflite(model, tmp_path / "q.tflite", **kwargs)
    assert os.listdir(tmp_path) == []


def test_int16x8_over_a_free_length_asks_for_a_fixed_one(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4)])
    data = np.zeros((8, 6, 3), "float32")
    with pytest.raises(ValueError, match="cannot calibrate .* fixed `timesteps`"):
        export_tflite(model, tmp_path / "q.tflite", quantize="int16x8", representative_data=data)


def _fused_model():
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((10, 3)),
            keras.layers.Bidirectional(GatedLSTM(6, return_sequences=True)),
            GatedLSTM(5, go_backwards=True),
            keras.layers.Dense(1),
        ]
    )


def test_fused_export_holds_the_fused_op_and_matches_keras_sequence_by_sequence(tmp_path):
    Interpreter = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="LiteRT's interpreter is the `litert` extra"
    ).Interpreter

    model = _fused_model()
    path = export_tflite(model, tmp_path / "f.tflite", fused=True)
    runner = Interpreter(model_path=str(path))
    ops = [op["op_name"] for op in runner._get_ops_details()]
    assert ops.count("UNIDIRECTIONAL_SEQUENCE_LSTM") == 3 and "WHILE" not in ops
    x = np.random.default_rng(6).standard_normal((8, 10, 3)).astype("float32")
    runner.allocate_tensors()
    index = runner.get_input_details()[0]["index"]
    got = []
    for row in x:
        runner.reset_all_variables()  # the op's states are variable tensors
        runner.set_tensor(index, row[None])
        runner.invoke()
        got.append(runner.get_tensor(runner.get_output_details()[0]["index"])[0])
    np.testing.assert_allclose(np.array(got), model.predict(x, verbose=0), atol=1e-5)


def test_fused_op_cell_state_is_not_clipped(tmp_path):
    # The converter sets cell_clip=10; a forget gate near 1 and an input near 1
    # grow c by about 1 a step, past 10 in 30 steps.
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((30, 1)), GatedLSTM(2), keras.layers.Dense(1)])
    kernel, recurrent, bias, dense, dense_bias = model.get_weights()
    bias[:] = 8.0  # every gate open, candidate tanh(8) ~ 1
    model.set_weights([kernel * 0, recurrent * 0, bias, dense, dense_bias])
    path = export_tflite(model, tmp_path / "f.tflite", fused=True)
    x = np.ones((1, 30, 1), "float32")
    Interpreter = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="LiteRT's interpreter is the `litert` extra"
    ).Interpreter

    runner = Interpreter(model_path=str(path))
    runner.allocate_tensors()
    runner.set_tensor(runner.get_input_details()[0]["index"], x)
    runner.invoke()
    got = runner.get_tensor(runner.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize(
    "layer, batch, reason",
    [
        (lambda: GatedLSTM(4, peephole=True), 1, "a cell option"),
        (lambda: GatedLSTM(4, return_state=True), 1, "returns its states"),
        (lambda: GatedLSTM(4), None, "fixed batch size"),
    ],
)
def test_layers_the_fused_op_cannot_express_stay_loops_with_a_reason(
    tmp_path, layer, batch, reason
):
    inputs = keras.Input((6, 3))
    outputs = layer()(inputs)
    outputs = outputs[0] if isinstance(outputs, list | tuple) else outputs
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match=f"stays a loop.*{reason}"):
        path = export_tflite(model, tmp_path / "f.tflite", fused=True, batch_size=batch)
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in op_names(interpreter(path))


def test_masked_layer_stays_a_loop_with_a_reason(tmp_path):
    model = keras.Sequential([keras.Input((6, 3)), keras.layers.Masking(), GatedLSTM(4)])
    with pytest.warns(UserWarning, match="masked, and the op takes no mask"):
        export_tflite(model, tmp_path / "f.tflite", fused=True)

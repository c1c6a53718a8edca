"""Bad input: one clear error naming the argument, before any TensorFlow op runs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, GatedLSTMCell


@pytest.mark.parametrize("units", [0, -3, 2.5, "8", True, None])
def test_units_must_be_a_positive_integer(units):
    with pytest.raises(ValueError, match=r"`units` must be a positive integer"):
        GatedLSTM(units)
    with pytest.raises(ValueError, match=r"`units` must be a positive integer"):
        GatedLSTMCell(units)


@pytest.mark.parametrize("argument", ["dropout", "recurrent_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "0.2"])
def test_dropout_rates_must_lie_in_zero_one(argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}` must be a float in \[0, 1\)"):
        GatedLSTM(4, **{argument: value})


@pytest.mark.parametrize(
    "argument,value",
    [
        ("activation", "tanhh"),
        ("recurrent_activation", "sigmoidd"),
        ("kernel_initializer", "glorot"),
        ("recurrent_initializer", "orthogonall"),
        ("bias_initializer", "zero_s"),
        ("kernel_regularizer", "l3"),
        ("bias_constraint", "positive"),
    ],
)
def test_unknown_names_say_which_argument(argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}` must be an? .* name known to Keras"):
        GatedLSTM(4, **{argument: value})


def test_use_cudnn_true_says_why_cudnn_cannot_run_here(rng):
    # As keras.layers.LSTM: accepted, and refused at the call where cuDNN cannot run.
    layer = GatedLSTM(4, use_cudnn=True)
    with pytest.raises(ValueError, match=r"`use_cudnn=True` but layer .* cannot run cuDNN here"):
        layer(rng.normal(size=(2, 5, 3)).astype("float32"))
    with pytest.raises(ValueError, match=r"`use_cudnn` must be 'auto', True or False"):
        GatedLSTM(4, use_cudnn="yes")
    GatedLSTM(4, use_cudnn=False)(rng.normal(size=(2, 5, 3)).astype("float32"))


@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 5, 3), (3,)])
def test_inputs_must_be_rank_3(shape):
    with pytest.raises(
        ValueError, match=r"`inputs` must be a 3D tensor \(batch, timesteps, features\)"
    ):
        GatedLSTM(4)(np.zeros(shape, "float32"))


def test_feature_size_must_match_the_built_layer():
    layer = GatedLSTM(4)
    layer(np.zeros((2, 3, 5), "float32"))
    with pytest.raises(ValueError, match=r"`inputs` has 6 features .* built for 5"):
        layer(np.zeros((2, 3, 6), "float32"))
    cell = GatedLSTMCell(4)
    cell.build((None, 5))
    with pytest.raises(ValueError, match=r"`inputs` has 6 features .* built for 5"):
        cell(np.zeros((2, 6), "float32"), [np.zeros((2, 4), "float32")] * 2)


def test_feature_size_mismatch_in_a_model_names_the_input():
    model = keras.Sequential([keras.Input((3, 5)), GatedLSTM(4)])
    with pytest.raises(ValueError, match=r"`inputs` has 6 features .* built for 5"):
        model(np.zeros((2, 3, 6), "float32"))


def test_initial_state_must_be_two_tensors_of_batch_by_units():
    x = np.zeros((2, 3, 5), "float32")
    h = np.zeros((2, 4), "float32")
    with pytest.raises(
        ValueError, match=r"`initial_state` must be a list of 2 tensors \[h, c\].* got 1"
    ):
        GatedLSTM(4)(x, initial_state=[h])
    with pytest.raises(
        ValueError, match=r"`initial_state` must be a list of 2 tensors.*single tensor"
    ):
        GatedLSTM(4)(x, initial_state=h)
    with pytest.raises(
        ValueError, match=r"`initial_state` c must have shape \(2, 4\), got \(2, 3\)"
    ):
        GatedLSTM(4)(x, initial_state=[h, np.zeros((2, 3), "float32")])
    with pytest.raises(
        ValueError, match=r"`initial_state` h must have shape \(2, 4\), got \(3, 4\)"
    ):
        GatedLSTM(4)(x, initial_state=[np.zeros((3, 4), "float32"), h])


def test_stateful_needs_a_fixed_batch_size():
    with pytest.raises(ValueError, match=r"`stateful=True` needs a fixed batch size.*batch_size=N"):
        keras.Sequential([keras.Input((3, 5)), GatedLSTM(4, stateful=True)])


def test_mask_must_be_batch_by_timesteps():
    x = np.zeros((2, 3, 5), "float32")
    with pytest.raises(
        ValueError, match=r"`mask` must have shape \(batch, timesteps\) = \(2, 3\), got \(2, 4\)"
    ):
        GatedLSTM(4)(x, mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"`mask` must have shape .* got \(2, 3, 1\)"):
        GatedLSTM(4)(x, mask=np.ones((2, 3, 1), bool))


def test_errors_are_raised_before_anything_is_built():
    layer = GatedLSTM(4)
    with pytest.raises(ValueError):
        layer(np.zeros((4, 3), "float32"))
    assert not layer.built and layer.weights == []


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "bool"])
def test_integer_and_boolean_inputs_are_cast_as_keras_lstm_does(dtype):
    x = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    reference = keras.layers.LSTM(6, return_sequences=True)
    expected = np.asarray(reference(x))  # Keras promotes them to float32
    ours = GatedLSTM(6, return_sequences=True)
    ours.build((None, 3, 4))
    ours.set_weights(reference.get_weights())
    np.testing.assert_allclose(np.asarray(ours(x)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(tf.constant(x))), expected, atol=1e-5)
    # The cell in keras.layers.RNN, which casts nothing itself.
    cell_layer = keras.layers.RNN(GatedLSTMCell(6), return_sequences=True)
    cell_layer.build((None, 3, 4))
    cell_layer.set_weights(reference.get_weights())
    np.testing.assert_allclose(np.asarray(cell_layer(x)), expected, atol=1e-5)


def test_text_inputs_are_refused_with_the_way_out():
    text = tf.constant([[["a", "b"], ["c", "d"]]])
    with pytest.raises(TypeError, match=r"`inputs` must be a floating-point, integer or boolean"):
        GatedLSTM(4)(text)
    cell = GatedLSTMCell(4)
    cell.build((None, 2))
    with pytest.raises(TypeError, match=r"got dtype string.*StringLookup"):
        cell(text[0], [np.zeros((1, 4), "float32")] * 2)


def test_sequences_need_at_least_one_step():
    with pytest.raises(ValueError, match=r"`inputs` has no time steps \(shape \(2, 0, 5\)\)"):
        GatedLSTM(4)(np.zeros((2, 0, 5), "float32"))


def test_cell_states_must_be_h_and_c_of_the_right_width():
    cell = GatedLSTMCell(4)
    cell.build((None, 5))
    x, h = np.zeros((2, 5), "float32"), np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match=r"`states` must be a list of 2 tensors \[h, c\].*single"):
        cell(x, h)
    with pytest.raises(ValueError, match=r"`states` c must have shape \(2, 4\), got \(2, 3\)"):
        cell(x, [h, np.zeros((2, 3), "float32")])
    with pytest.raises(ValueError, match=r"`states` h must have shape \(2, 4\), got \(3, 4\)"):
        cell(x, [np.zeros((3, 4), "float32"), h])

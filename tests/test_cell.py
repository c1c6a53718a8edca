"""GatedLSTMCell against a NumPy re-derivation of the tutorial's equations, and its contract."""

import keras
import numpy as np

from keras_lstm import GatedLSTMCell, LSTMGates


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))  # the tutorial misprints this as 1 / (1 - e^-x)


def numpy_lstm(x, kernel, recurrent_kernel, bias, h, c):
    """The tutorial's LSTM, step by step, in float64 NumPy. Gate order i, f, c, o."""
    units = h.shape[-1]
    w = {gate: kernel[:, k * units : (k + 1) * units] for k, gate in enumerate("ifco")}
    u = {gate: recurrent_kernel[:, k * units : (k + 1) * units] for k, gate in enumerate("ifco")}
    b = {gate: bias[k * units : (k + 1) * units] for k, gate in enumerate("ifco")}
    hs, gates = [], []
    for t in range(x.shape[1]):
        x_t = x[:, t]
        f = sigmoid(x_t @ w["f"] + h @ u["f"] + b["f"])  # forget gate
        i = sigmoid(x_t @ w["i"] + h @ u["i"] + b["i"])  # input gate
        candidate = np.tanh(x_t @ w["c"] + h @ u["c"] + b["c"])
        c = f * c + i * candidate  # final cell state C_t
        o = sigmoid(x_t @ w["o"] + h @ u["o"] + b["o"])  # output gate
        h = o * np.tanh(c)
        hs.append(h)
        gates.append((f, i, candidate, o, c, h))
    return np.stack(hs, axis=1), h, c, gates


def _built_cell(rng, units=5, features=3):
    cell = GatedLSTMCell(units)
    cell.build((None, features))
    cell.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in cell.get_weights()])
    return cell


def test_cell_steps_match_numpy_rederivation_of_the_equations(rng):
    cell = _built_cell(rng)
    x = rng.normal(size=(4, 6, 3)).astype("float32")
    h0 = rng.normal(size=(4, 5)).astype("float32")
    c0 = rng.normal(size=(4, 5)).astype("float32")
    kernel, recurrent_kernel, bias = (w.astype("float64") for w in cell.get_weights())
    _, _, _, expected = numpy_lstm(x.astype("float64"), kernel, recurrent_kernel, bias, h0, c0)

    states = [h0, c0]
    for t in range(x.shape[1]):
        gates, states = cell(x[:, t], states, return_gates=True)
        assert isinstance(gates, LSTMGates)
        for got, want in zip(gates, expected[t], strict=False):
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(states[0]), expected[t][5], atol=1e-5)
        np.testing.assert_allclose(np.asarray(states[1]), expected[t][4], atol=1e-5)


def test_whole_rnn_matches_numpy_rederivation(rng):
    cell = _built_cell(rng)
    x = rng.normal(size=(2, 7, 3)).astype("float32")
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    seq, h, c = rnn(x)
    weights = [w.astype("float64") for w in cell.get_weights()]
    zeros = np.zeros((2, 5))
    want_seq, want_h, want_c, _ = numpy_lstm(x.astype("float64"), *weights, zeros, zeros)
    np.testing.assert_allclose(np.asarray(seq), want_seq, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), want_h, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), want_c, atol=1e-5)


def test_weights_have_keras_names_shapes_and_move_both_ways(rng):
    ours, theirs = GatedLSTMCell(5), keras.layers.LSTMCell(5)
    ours.build((None, 3))
    theirs.build((None, 3))
    assert [(w.name, w.shape) for w in ours.weights] == [(w.name, w.shape) for w in theirs.weights]
    assert [w.shape for w in ours.weights] == [(3, 20), (5, 20), (20,)]

    x = rng.normal(size=(4, 3)).astype("float32")
    states = [rng.normal(size=(4, 5)).astype("float32") for _ in range(2)]
    for source, target in [(theirs, ours), (ours, theirs)]:
        source.set_weights([rng.normal(size=w.shape).astype("float32") for w in source.weights])
        target.set_weights(source.get_weights())
        got, want = target(x, states), source(x, states)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[1][1]), np.asarray(want[1][1]), atol=1e-6)


def test_unit_forget_bias_starts_the_forget_slice_at_one():
    cell = GatedLSTMCell(3, bias_initializer="ones")
    cell.build((None, 2))
    np.testing.assert_array_equal(cell.bias.numpy(), np.ones(12))
    cell = GatedLSTMCell(3, bias_initializer=keras.initializers.Constant(0.5))
    cell.build((None, 2))
    np.testing.assert_array_equal(cell.bias.numpy(), [0.5] * 3 + [1.0] * 3 + [0.5] * 6)
    cell = GatedLSTMCell(3, unit_forget_bias=False)
    cell.build((None, 2))
    np.testing.assert_array_equal(cell.bias.numpy(), np.zeros(12))


def test_initial_state_is_zeros_of_state_size():
    cell = GatedLSTMCell(4)
    h, c = cell.get_initial_state(batch_size=3)
    assert h.shape == (3, 4) and c.shape == (3, 4)
    assert cell.state_size == [4, 4] and cell.output_size == 4
    assert not np.any(np.asarray(h)) and not np.any(np.asarray(c))


def test_cell_config_round_trips_every_argument():
    cell = GatedLSTMCell(
        7,
        activation="relu",
        recurrent_activation="hard_sigmoid",
        use_bias=False,
        kernel_initializer="he_normal",
        recurrent_initializer="glorot_normal",
        bias_initializer="ones",
        unit_forget_bias=False,
        kernel_regularizer="l2",
        recurrent_regularizer="l1",
        bias_regularizer=keras.regularizers.L1L2(0.1, 0.2),
        kernel_constraint="non_neg",
        recurrent_constraint=keras.constraints.MaxNorm(2.0),
        bias_constraint="unit_norm",
        dropout=0.25,
        recurrent_dropout=0.5,
        seed=42,
        name="my_cell",
    )
    config = cell.get_config()
    clone = GatedLSTMCell.from_config(config)
    assert clone.get_config() == config
    assert config["units"] == 7 and config["dropout"] == 0.25 and config["seed"] == 42
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cell))
    assert isinstance(restored, GatedLSTMCell) and restored.get_config() == config


def test_dropout_uses_one_mask_for_the_whole_sequence():
    seen = []

    class RecordingCell(GatedLSTMCell):
        def _apply_dropout(self, inputs, h_prev, training):
            x, h = super()._apply_dropout(inputs, h_prev, training)
            seen.append((np.asarray(x), np.asarray(h)))
            return x, h

    cell = RecordingCell(6, dropout=0.5, recurrent_dropout=0.5, seed=3)
    rnn = keras.layers.RNN(cell, unroll=True)  # a Python loop, so every step is visible
    rnn(np.ones((4, 5, 8), "float32"), training=True)
    input_masks = [x for x, _ in seen]
    assert all(np.array_equal(m, input_masks[0]) for m in input_masks)
    assert set(np.unique(input_masks[0])) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    # Recurrent masks: h differs per step, so compare where h was zeroed.
    dropped = [h == 0 for _, h in seen[1:]]
    assert all(np.array_equal(d, dropped[0]) for d in dropped) and dropped[0].any()

    seen.clear()
    rnn(np.ones((4, 5, 8), "float32"), training=True)
    assert not np.array_equal(seen[0][0], input_masks[0])  # a new sequence, a new mask

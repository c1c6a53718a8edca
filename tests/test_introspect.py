"""trace_gates against a NumPy step loop, and plot_gates."""

import sys

import keras
import numpy as np
import pytest
from lstm_reference import run, weights_by_name

import keras_lstm
from keras_lstm import GatedLSTM, GatedLSTMCell

FIELDS = ("forget", "input", "candidate", "output", "cell", "hidden")


def _randomize(layer, rng):
    layer.set_weights([rng.normal(0, 0.6, w.shape).astype("float32") for w in layer.weights])


def _assert_trace_matches(trace, expected):
    for field in FIELDS:
        got = getattr(trace, field)
        assert isinstance(got, np.ndarray), field
        np.testing.assert_allclose(got, expected[field], atol=1e-5, err_msg=field)


def test_trace_gates_of_a_layer_matches_a_numpy_step_loop(rng):
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    opts = dict(cifg=True, proj_units=2, zoneout_c=0.3)
    layer = GatedLSTM(4, return_sequences=True, **opts)
    layer(x)
    _randomize(layer, rng)
    trace = keras_lstm.trace_gates(layer, x)
    assert list(trace) == [layer.name]
    gates = trace[layer.name]
    assert gates.forget.shape == (2, 5, 4) and gates.hidden.shape == (2, 5, 2)
    _assert_trace_matches(gates, run(x, weights_by_name(layer), opts))
    np.testing.assert_allclose(gates.input, 1 - gates.forget, atol=1e-6)
    np.testing.assert_allclose(gates.hidden, layer(x), atol=1e-5)


def test_trace_gates_of_a_sequential_stack_matches_its_output(rng):
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    first, second = GatedLSTM(4, return_sequences=True), GatedLSTM(2, cell_clip=0.5)
    model = keras.Sequential([keras.Input((4, 3)), first, second])
    trace = keras_lstm.trace_gates(model, x)
    assert list(trace) == [first.name, second.name]
    np.testing.assert_allclose(trace[first.name].hidden, first(x), atol=1e-5)
    np.testing.assert_allclose(trace[second.name].hidden[:, -1], model(x), atol=1e-5)


def test_trace_gates_inside_a_model_follows_masks_and_leaves_the_model_unchanged(rng):
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    x[0, 4:] = 0.0
    x[2, 2:] = 0.0
    inputs = keras.Input((6, 2))
    masked = keras.layers.Masking()(inputs)
    dense = keras.layers.Dense(3, activation="tanh")(masked)
    first = GatedLSTM(4, return_sequences=True, peephole=True, layer_norm=True)
    wrapped = keras.layers.Bidirectional(GatedLSTM(3, return_sequences=True))
    plain_rnn = keras.layers.RNN(GatedLSTMCell(2), return_sequences=True)
    out = plain_rnn(wrapped(first(dense)))
    model = keras.Model(inputs, keras.layers.Dense(1)(out))
    for layer in (first, wrapped, plain_rnn):
        _randomize(layer, rng)
    before_out = np.asarray(model(x))
    before_weights = [w.copy() for w in model.get_weights()]

    trace = keras_lstm.trace_gates(model, x)

    assert sorted(trace) == sorted(
        [
            first.name,
            f"{wrapped.name}/{wrapped.forward_layer.name}",
            f"{wrapped.name}/{wrapped.backward_layer.name}",
            plain_rnn.name,
        ]
    )
    mask = np.any(x != 0, axis=-1)
    dense_out = np.asarray(keras.Model(inputs, dense)(x), "float64")
    ref_first = run(dense_out, weights_by_name(first), dict(peephole=True, layer_norm=True), mask)
    _assert_trace_matches(trace[first.name], ref_first)
    backward = trace[f"{wrapped.name}/{wrapped.backward_layer.name}"]
    ref_backward = run(
        ref_first["hidden"], weights_by_name(wrapped.backward_layer), {}, mask, go_backwards=True
    )
    _assert_trace_matches(backward, ref_backward)
    # Keras repeats the last kept output at masked steps, as the trace carries it.
    np.testing.assert_allclose(trace[plain_rnn.name].hidden, keras.Model(inputs, out)(x), atol=1e-5)

    np.testing.assert_array_equal(model(x), before_out)
    for a, b in zip(before_weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_trace_gates_starts_from_the_initial_state_the_layer_is_called_with(rng):
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    h0 = rng.normal(size=(2, 5)).astype("float32")
    seq_in, h_in, c_in = keras.Input((4, 3)), keras.Input((5,)), keras.Input((5,))
    layer = GatedLSTM(5, return_sequences=True)
    model = keras.Model([seq_in, h_in, c_in], layer(seq_in, initial_state=[h_in, c_in]))
    trace = keras_lstm.trace_gates(model, [x, h0, -h0])
    np.testing.assert_allclose(trace[layer.name].hidden, model([x, h0, -h0]), atol=1e-5)


def test_trace_gates_rejects_what_it_cannot_trace():
    with pytest.raises(TypeError, match="`model_or_layer` must be a keras.Model, a GatedLSTM"):
        keras_lstm.trace_gates(keras.layers.LSTM(3), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="is not built yet"):
        keras_lstm.trace_gates(GatedLSTM(3), np.zeros((1, 2, 3)))
    dense_only = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="has no layer with a GatedLSTMCell"):
        keras_lstm.trace_gates(dense_only, np.zeros((1, 2)))


def test_plot_gates_draws_six_panels_of_the_chosen_sample(rng):
    pytest.importorskip("matplotlib", reason="plot_gates needs the `plot` extra")
    import matplotlib

    matplotlib.use("Agg")
    x = rng.normal(size=(2, 7, 3)).astype("float32")
    layer = GatedLSTM(4, return_sequences=True)
    layer(x)
    trace = keras_lstm.trace_gates(layer, x)
    figure = keras_lstm.plot_gates(trace, sample=1, units=[0, 2])
    images = [ax.images[0] for ax in figure.axes if ax.images]
    assert len(images) == 6
    np.testing.assert_allclose(images[0].get_array(), trace[layer.name].forget[1][:, [0, 2]].T)
    np.testing.assert_allclose(images[5].get_array(), trace[layer.name].hidden[1][:, [0, 2]].T)
    with pytest.raises(ValueError, match=r"`sample` must be in \[0, 2\)"):
        keras_lstm.plot_gates(trace, sample=2)
    with pytest.raises(ValueError, match="`layer` must be one of"):
        keras_lstm.plot_gates(trace, layer="nope")
    matplotlib.pyplot.close("all")


def test_plot_gates_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-lstm\[plot\]'"):
        keras_lstm.plot_gates({})

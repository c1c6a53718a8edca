"""GatedLSTM and GatedLSTMCell wherever keras.layers.LSTM and LSTMCell stand in a model."""

import keras
import numpy as np
import tensorflow as tf

from keras_lstm import GatedLSTM, GatedLSTMCell
from keras_lstm.kernels import native_available

TOL = 1e-5


def _copy_weights(source: keras.Model, target: keras.Model):
    assert [w.shape for w in source.weights] == [w.shape for w in target.weights]
    target.set_weights(source.get_weights())


def _assert_models_agree(ours, theirs, *inputs):
    rng = np.random.default_rng(3)
    theirs.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") for w in theirs.weights])
    _copy_weights(theirs, ours)
    feed = inputs[0] if len(inputs) == 1 else list(inputs)
    a, b = ours.predict(feed, verbose=0), theirs.predict(feed, verbose=0)
    for got, want in zip(keras.tree.flatten(a), keras.tree.flatten(b), strict=False):
        np.testing.assert_allclose(got, want, atol=TOL)


def _sequential(recurrent, features=4, steps=6):
    return keras.Sequential([keras.Input((steps, features)), recurrent, keras.layers.Dense(2)])


def test_sequential_model_matches_keras_lstm():
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    _assert_models_agree(_sequential(GatedLSTM(8)), _sequential(keras.layers.LSTM(8)), x)


def test_functional_model_with_states_matches_keras_lstm():
    def build(layer_class):
        inputs = keras.Input((None, 4))
        seq, h, c = layer_class(8, return_sequences=True, return_state=True)(inputs)
        pooled = keras.layers.GlobalAveragePooling1D()(seq)
        return keras.Model(inputs, [keras.layers.Concatenate()([pooled, h, c])])

    x = np.random.default_rng(0).normal(size=(5, 9, 4)).astype("float32")
    _assert_models_agree(build(GatedLSTM), build(keras.layers.LSTM), x)


def test_cell_in_keras_rnn_matches_lstm_cell():
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    _assert_models_agree(
        _sequential(keras.layers.RNN(GatedLSTMCell(8))),
        _sequential(keras.layers.RNN(keras.layers.LSTMCell(8))),
        x,
    )


def test_stacked_cells_match_stacked_lstm_cells():
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    _assert_models_agree(
        _sequential(keras.layers.RNN([GatedLSTMCell(8), GatedLSTMCell(3)], return_sequences=True)),
        _sequential(
            keras.layers.RNN(
                [keras.layers.LSTMCell(8), keras.layers.LSTMCell(3)], return_sequences=True
            )
        ),
        x,
    )


def test_bidirectional_matches_keras_bidirectional_lstm():
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    _assert_models_agree(
        _sequential(keras.layers.Bidirectional(GatedLSTM(8, return_sequences=True))),
        _sequential(keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True))),
        x,
    )
    _assert_models_agree(
        _sequential(keras.layers.Bidirectional(keras.layers.RNN(GatedLSTMCell(8)))),
        _sequential(keras.layers.Bidirectional(keras.layers.LSTM(8))),
        x,
    )


def test_masking_layer_and_mask_zero_embedding_match_keras():
    x = np.random.default_rng(0).normal(size=(4, 6, 3)).astype("float32")
    x[0, 4:] = 0.0
    x[2, 1] = 0.0

    def masked(layer):
        return keras.Sequential(
            [keras.Input((6, 3)), keras.layers.Masking(0.0), layer, keras.layers.Dense(1)]
        )

    _assert_models_agree(masked(GatedLSTM(5)), masked(keras.layers.LSTM(5)), x)

    tokens = np.array([[3, 1, 4, 0, 0], [2, 7, 0, 0, 0], [5, 9, 2, 6, 5]])

    def embedded(layer):
        return keras.Sequential(
            [keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4, mask_zero=True), layer]
        )

    _assert_models_agree(
        embedded(GatedLSTM(5, return_sequences=True)),
        embedded(keras.layers.LSTM(5, return_sequences=True)),
        tokens,
    )


def test_initial_state_from_another_layer_in_a_functional_model():
    def build(layer_class):
        inputs, context = keras.Input((6, 4)), keras.Input((3,))
        h0 = keras.layers.Dense(8)(context)
        c0 = keras.layers.Dense(8)(context)
        out = layer_class(8)(inputs, initial_state=[h0, c0])
        return keras.Model([inputs, context], out)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 4)).astype("float32")
    context = rng.normal(size=(5, 3)).astype("float32")
    _assert_models_agree(build(GatedLSTM), build(keras.layers.LSTM), x, context)


def test_stateful_model_streams_chunks_and_resets():
    x = np.random.default_rng(0).normal(size=(2, 8, 3)).astype("float32")
    model = keras.Sequential(
        [keras.Input(batch_shape=(2, None, 3)), GatedLSTM(4, stateful=True, return_sequences=True)]
    )
    whole = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4, return_sequences=True)])
    _copy_weights(model, whole)
    chunks = [model.predict_on_batch(x[:, s : s + 4]) for s in (0, 4)]
    np.testing.assert_allclose(
        np.concatenate(chunks, axis=1), whole.predict(x, verbose=0), atol=TOL
    )
    model.layers[0].reset_state()
    np.testing.assert_allclose(
        model.predict_on_batch(x[:, :4]), whole.predict(x[:, :4], verbose=0), atol=TOL
    )


def test_model_trains_under_xla_and_stays_jit_compiled():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10, 2)).astype("float32")
    y = x[:, :, 0].sum(axis=1, keepdims=True)  # a running sum: needs memory across steps
    model = keras.Sequential([keras.Input((10, 2)), GatedLSTM(16), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=True)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert model.jit_compile is True
    assert all(layer.supports_jit for layer in model.layers)
    assert after < 0.1 * before, (before, after)
    prediction = model.predict(x[:4], verbose=0)
    assert prediction.shape == (4, 1)


def test_forward_and_backward_lower_to_hlo_under_jit_compile():
    layer = GatedLSTM(4, return_sequences=True)
    x = tf.random.normal((2, 5, 3))
    layer.build(x.shape)

    @tf.function(jit_compile=True)
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return loss, tape.gradient(loss, [x] + layer.trainable_weights)

    hlo = forward_backward.experimental_get_compiler_ir(x)(stage="hlo")
    assert "HloModule" in hlo
    # On CPU the native kernel lowers to our custom calls when its XLA library builds;
    # otherwise (or on GPU) the fused op is a while loop.
    native = not tf.config.list_logical_devices("GPU") and native_available(jit_compile=True)
    assert ("keras_lstm_sequence_forward" in hlo) if native else ("while" in hlo)
    loss, grads = forward_backward(x)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grads)

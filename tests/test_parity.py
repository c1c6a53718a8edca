"""GatedLSTM against keras.layers.LSTM with the same weights: outputs, states and gradients."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM

B, T, D, H = 3, 6, 4, 5
TOL = 1e-5


def _pair(**kwargs):
    """Our layer and Keras's, built and holding the same random weights."""
    ours, theirs = GatedLSTM(H, **kwargs), keras.layers.LSTM(H, **kwargs)
    build_shape = (B, T, D)
    ours.build(build_shape)
    theirs.build(build_shape)
    rng = np.random.default_rng(7)
    theirs.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") for w in theirs.weights])
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def _forward_and_gradients(layer, x, jit, **call_kwargs):
    """Outputs, and gradients of a fixed random projection of them, w.r.t. inputs and weights."""
    x = tf.constant(x)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, **call_kwargs)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            loss = sum(
                tf.reduce_sum(o * tf.cos(tf.reshape(tf.range(tf.size(o), dtype=o.dtype), o.shape)))
                for o in outputs
            )
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return outputs, grads

    if jit:
        run = tf.function(run, jit_compile=True)
    outputs, grads = run(x)
    return [np.asarray(o) for o in outputs], [np.asarray(g) for g in grads]


def _assert_same(ours, theirs, x, jit=False, **call_kwargs):
    out_a, grad_a = _forward_and_gradients(ours, x, jit, **call_kwargs)
    out_b, grad_b = _forward_and_gradients(theirs, x, jit, **call_kwargs)
    assert len(out_a) == len(out_b)
    for a, b in zip(out_a, out_b, strict=False):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    names = ["inputs", "kernel", "recurrent_kernel", "bias"]
    for name, a, b in zip(names, grad_a, grad_b, strict=False):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"gradient w.r.t. {name}")
    return out_a


@pytest.fixture
def x():
    return np.random.default_rng(1).normal(size=(B, T, D)).astype("float32")


@pytest.mark.parametrize(
    "return_sequences,return_state,jit",
    list(itertools.product([False, True], [False, True], [False, True])),
)
def test_outputs_states_and_gradients_match_keras(x, return_sequences, return_state, jit):
    ours, theirs = _pair(return_sequences=return_sequences, return_state=return_state)
    outputs = _assert_same(ours, theirs, x, jit=jit)
    assert len(outputs) == (3 if return_state else 1)


@pytest.mark.parametrize("jit", [False, True])
def test_go_backwards_matches_keras(x, jit):
    ours, theirs = _pair(go_backwards=True, return_sequences=True, return_state=True)
    _assert_same(ours, theirs, x, jit=jit)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("layout", ["right_padded", "with_gaps"])
def test_masking_matches_keras(x, layout, jit):
    mask = np.ones((B, T), bool)
    if layout == "right_padded":
        mask[0, 4:] = False
        mask[1, 2:] = False
    else:
        mask[0, [1, 3]] = False
        mask[2, [0, 5]] = False
    ours, theirs = _pair(return_sequences=True, return_state=True)
    _assert_same(ours, theirs, x, jit=jit, mask=tf.constant(mask))


@pytest.mark.parametrize("jit", [False, True])
def test_initial_state_matches_keras(x, jit):
    rng = np.random.default_rng(2)
    state = [tf.constant(rng.normal(size=(B, H)).astype("float32")) for _ in range(2)]
    ours, theirs = _pair(return_sequences=True, return_state=True)
    _assert_same(ours, theirs, x, jit=jit, initial_state=state)


def test_unroll_matches_keras(x):
    ours, theirs = _pair(unroll=True, return_sequences=True, return_state=True)
    _assert_same(ours, theirs, x)


def test_stateful_carries_state_across_calls_like_keras(x):
    ours, theirs = _pair(stateful=True, return_sequences=True)
    for chunk in (x[:, :3], x[:, 3:]):
        np.testing.assert_allclose(np.asarray(ours(chunk)), np.asarray(theirs(chunk)), atol=TOL)
    for a, b in zip(ours.states, theirs.states, strict=False):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
    # Two chunks with carried state equal one pass over the whole sequence.
    whole, _ = _pair(return_sequences=True)
    np.testing.assert_allclose(np.asarray(ours.states[0]), np.asarray(whole(x))[:, -1], atol=TOL)
    ours.reset_state()
    theirs.reset_state()
    assert not np.any(np.asarray(ours.states[0]))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), atol=TOL)


@pytest.mark.parametrize("return_sequences", [True, False])
def test_unrolled_backward_layer_zeroes_masked_outputs_like_the_symbolic_loop(x, return_sequences):
    # Bidirectional turns zero_output_for_mask on; Keras's own unrolled loop gets this wrong.
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    kwargs = dict(go_backwards=True, return_sequences=return_sequences, zero_output_for_mask=True)
    ours, reference = _pair(unroll=True, **kwargs)
    symbolic = keras.layers.LSTM(H, use_cudnn=False, **kwargs)
    symbolic.build((B, T, D))
    symbolic.set_weights(reference.get_weights())
    got = np.asarray(ours(x, mask=tf.constant(mask)))
    want = np.asarray(symbolic(x, mask=tf.constant(mask)))
    np.testing.assert_allclose(got, want, atol=TOL)
    if return_sequences:
        assert np.abs(want[0, : T - 4]).max() == 0 and np.abs(want[1, -2:]).max() == 0

"""GatedLSTM under mixed_float16 and mixed_bfloat16 policies.

The policy's rule, as in `keras.layers.LSTM`: weights are stored in float32,
the gate maths runs in the compute dtype (float16 or bfloat16), outputs and
returned states come back in the compute dtype, and a stateful layer keeps its
carried state in float32 variables. Each check compares against float32 maths
with the same weights or against `keras.layers.LSTM` under the same policy.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, GatedLSTMCell
from keras_lstm.datasets import seattle_hourly_temperatures
from keras_lstm.demo import WINDOW, build_model, make_windows

POLICIES = ["mixed_float16", "mixed_bfloat16"]
COMPUTE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
# Worst abs error against float32 maths for values of order 1 (8 and 11 bit mantissas).
TOLERANCE = {"mixed_float16": 5e-3, "mixed_bfloat16": 4e-2}
# float16 trains under XLA as the demo does; bfloat16 as a plain tf.function
# graph, which covers the other path (XLA compiling bfloat16 on a CPU costs ~10 s).
JIT = {"mixed_float16": True, "mixed_bfloat16": False}


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy("float32")


def _dtype(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, "float32") - np.asarray(b, "float32"))))


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_mixed_policy_trains_forecaster_without_nan(policy):
    train, val, _, _ = make_windows(*(part[: 12 * 24] for part in seattle_hourly_temperatures()))
    model = build_model(GatedLSTM(8, name="gated_lstm"))
    layer = model.get_layer("gated_lstm")
    assert layer.compute_dtype == COMPUTE[policy]
    assert all(w.dtype == "float32" for w in model.weights)

    # Same weights in float32: the mixed forward pass agrees to its precision.
    keras.config.set_dtype_policy("float32")
    reference = build_model(GatedLSTM(8, name="gated_lstm"))
    keras.config.set_dtype_policy(policy)
    reference.set_weights(model.get_weights())
    assert _dtype(layer.output) == _dtype(model.output) == COMPUTE[policy]
    mixed_out = model.predict(val.x[:64], verbose=0)
    diff = _max_diff(mixed_out, reference.predict(val.x[:64], verbose=0))
    print(f"\n{policy}: forecaster output vs float32, max abs diff {diff:.2e}")
    assert diff <= TOLERANCE[policy]

    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", jit_compile=JIT[policy])
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(train.x, train.y, epochs=3, batch_size=32, verbose=0).history
    print(f"{policy}: training loss by epoch {np.round(history['loss'], 4).tolist()}")
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert all(w.dtype == "float32" for w in model.weights)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_cell_computes_gates_in_compute_dtype(policy, rng):
    x = rng.normal(size=(3, 2)).astype("float32")
    states = [rng.normal(size=(3, 4)).astype("float32") * 0.5 for _ in range(2)]
    cell = GatedLSTMCell(4)
    gates, new_states = cell(x, states, return_gates=True)
    assert cell.kernel.dtype == "float32"
    assert {_dtype(g) for g in [*gates, *new_states]} == {COMPUTE[policy]}

    keras.config.set_dtype_policy("float32")
    reference = GatedLSTMCell(4)
    reference.build((3, 2))
    reference.set_weights(cell.get_weights())
    want, _ = reference(x, states, return_gates=True)
    for name, got, expected in zip(want._fields, gates, want, strict=True):
        assert _max_diff(got, expected) <= TOLERANCE[policy], name


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_outputs_states_and_state_variables_have_keras_lstm_dtypes(policy, rng):
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    ours = GatedLSTM(4, return_sequences=True, return_state=True, stateful=True)
    theirs = keras.layers.LSTM(4, return_sequences=True, return_state=True, stateful=True)
    got, want = ours(x), theirs(x)
    assert [_dtype(t) for t in got] == [_dtype(t) for t in want] == [COMPUTE[policy]] * 3
    assert [v.dtype for v in ours.states] == [v.dtype for v in theirs.states] == ["float32"] * 2


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_stateful_layer_carries_and_resets_state_under_mixed_policy(policy, rng):
    first, second = (rng.normal(size=(2, 6, 3)).astype("float32") for _ in range(2))
    layer = GatedLSTM(5, stateful=True, return_sequences=True)
    layer(first)
    carried = [np.asarray(v.numpy()) for v in layer.states]
    out_second = layer(second)
    assert all(np.abs(c).max() > 1e-2 for c in carried)

    # Float32 maths, same weights, the carried state passed by hand.
    keras.config.set_dtype_policy("float32")
    reference = GatedLSTM(5, return_sequences=True, return_state=True)
    reference.build((2, 6, 3))
    reference.set_weights(layer.get_weights())
    _, h, c = reference(first)
    want_second, _, _ = reference(second, initial_state=[h, c])
    assert _max_diff(carried[0], h) <= TOLERANCE[policy]
    assert _max_diff(carried[1], c) <= TOLERANCE[policy]
    assert _max_diff(out_second, want_second) <= TOLERANCE[policy]

    layer.reset_state()
    assert all(np.abs(v.numpy()).max() == 0 for v in layer.states)
    assert all(v.dtype == "float32" for v in layer.states)
    fresh = reference(second)[0]
    assert _max_diff(layer(second), fresh) <= TOLERANCE[policy]


def test_stateful_model_fits_under_mixed_float16(rng):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x = rng.normal(size=(8, 6, 3)).astype("float32")
        y = x[:, -1, :1]
        model = keras.Sequential(
            [
                keras.Input((6, 3), batch_size=4),
                GatedLSTM(5, stateful=True, name="lstm"),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile(optimizer="adam", loss="mse", jit_compile=False)
        history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(history["loss"]))
    states = model.get_layer("lstm").states
    assert all(v.dtype == "float32" and np.abs(v.numpy()).max() > 0 for v in states)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_mixed_policy_model_exports_as_saved_model(policy, tmp_path):
    model = build_model(GatedLSTM(6))
    x = np.random.default_rng(1).normal(size=(4, WINDOW, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.export(str(tmp_path / "served"), format="tf_saved_model")

    served = tf.saved_model.load(str(tmp_path / "served"))
    got = served.serve(tf.constant(x))
    assert got.dtype.name == COMPUTE[policy]
    # On CPU `predict` runs the native kernel in float32 and rounds once at the
    # end; the export computes in the policy's dtype at every step. bfloat16
    # keeps 8 bits: one rounding step near 0.5 is 0.004.
    atol = {"mixed_float16": 1e-3, "mixed_bfloat16": 1e-2}[policy]
    np.testing.assert_allclose(np.asarray(got, "float32"), expected.astype("float32"), atol=atol)
    signature = served.signatures["serving_default"]
    (output,) = signature(tf.constant(x)).values()
    np.testing.assert_allclose(np.asarray(output, "float32"), expected.astype("float32"), atol=atol)


def test_float32_output_layer_serves_float32_under_mixed_float16(tmp_path, rng):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((WINDOW, 3))
        hidden = GatedLSTM(6)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(hidden))
    finally:
        keras.config.set_dtype_policy("float32")
    assert _dtype(hidden) == "float16"
    x = rng.normal(size=(2, WINDOW, 3)).astype("float32")
    model.export(str(tmp_path / "served"), format="tf_saved_model")
    served = tf.saved_model.load(str(tmp_path / "served"))
    got = served.serve(tf.constant(x))
    assert got.dtype == tf.float32
    # float16 inside: the export's loop adds the bias at each step, predict's
    # before the loop, so their float16 roundings differ (by about 5e-6 here).
    np.testing.assert_allclose(got.numpy(), model.predict(x, verbose=0), atol=1e-4)

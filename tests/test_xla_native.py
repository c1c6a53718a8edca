"""Under `jit_compile=True` on CPU the native kernel runs as an XLA custom call.

Outputs and gradients are compared with `keras.layers.LSTM` compiled the same
way (an independent implementation); the compiled HLO is checked for our
custom calls, so that a silent fallback to the `tf.while_loop` path fails.
"""

import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, _routes, kernels
from keras_lstm.kernels import _build, _native, _native_xla

B, T, D, H = 3, 6, 4, 5
TOL = 1e-5
FORWARD, BACKWARD = b"keras_lstm_sequence_forward", b"keras_lstm_sequence_backward"

# Row 0 has a gap in the middle, row 1 starts masked, row 2 ends masked.
MASK = np.array([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=bool)


@pytest.fixture(scope="module")
def xla_library():
    if not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here (no g++ or headers)")


@pytest.mark.skipif(
    shutil.which("g++") is None or not _build.supported_platform(),
    reason="no C++ compiler or an unsupported platform: XLA runs the TF-ops loop",
)
def test_xla_library_builds_where_a_compiler_is_present(monkeypatch):
    # Where g++ is, the tests above must not skip: a broken build fails here.
    monkeypatch.delenv("KERAS_LSTM_NATIVE", raising=False)
    assert kernels.native_available(jit_compile=True)


def _pair(**options):
    ours, reference = GatedLSTM(H, **options), keras.layers.LSTM(H, **options)
    ours.build((B, T, D))
    reference.build((B, T, D))
    # Non-trivial weights, a random bias too, so that every gate's gradient shows.
    weights = [w + 0.1 for w in ours.get_weights()]
    ours.set_weights(weights)
    reference.set_weights(weights)
    return ours, reference


def _compiled_step(layer, training=True):
    @tf.function(jit_compile=True)
    def step(x, mask, h0, c0):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            out = layer(x, mask=mask, initial_state=[h0, c0], training=training)
            outs = out if isinstance(out, (list, tuple)) else [out]
            # Each output weighted differently, so that no gradient is trivially symmetric.
            loss = sum(tf.reduce_sum(o * o * _ramp(o)) for o in outs)
        return outs, tape.gradient(loss, [x, h0, c0, *layer.trainable_weights])

    return step


def _ramp(o):
    size = tf.size(o)
    return tf.reshape(tf.cast(tf.range(1, size + 1), o.dtype) / tf.cast(size, o.dtype), o.shape)


def _data(rng, mask=MASK):
    batch = mask.shape[0]
    x = rng.normal(size=(batch, T, D)).astype("float32")
    h0, c0 = (rng.normal(size=(batch, H)).astype("float32") for _ in range(2))
    return tuple(tf.constant(a) for a in (x, mask, h0, c0))


def _hlo(step, args):
    return step.experimental_get_compiler_ir(*args)(stage="hlo").encode()


@pytest.mark.parametrize(
    "options, training",
    [
        ({"return_sequences": True}, True),
        ({"return_sequences": False, "return_state": True}, True),
        ({"return_sequences": True, "go_backwards": True, "return_state": True}, True),
        ({"return_sequences": True, "zero_output_for_mask": True}, False),
    ],
    ids=["sequences", "last_and_state", "backwards", "inference_zero_output_for_mask"],
)
def test_jit_outputs_and_gradients_match_keras_lstm(xla_library, rng, options, training):
    ours, reference = _pair(**options)
    args = _data(rng)
    step = _compiled_step(ours, training)
    outs, grads = step(*args)
    outs_ref, grads_ref = _compiled_step(reference, training)(*args)
    assert len(outs) == len(outs_ref)
    for a, b in zip(outs, outs_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)
    # x, h0, c0, kernel, recurrent_kernel, bias
    for a, b in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)
    hlo = _hlo(step, args)
    assert FORWARD in hlo and BACKWARD in hlo


def test_jit_matches_keras_lstm_on_a_batch_split_across_threads(xla_library, rng):
    # 16 rows: as many chunks as there are CPUs (up to 4), so the pool's threads take part.
    mask = rng.random((16, T)) > 0.3
    ours, reference = _pair(return_sequences=True, return_state=True)
    args = _data(rng, mask)
    for a, b in zip(_compiled_step(ours)(*args), _compiled_step(reference)(*args), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=TOL, rtol=TOL)


def test_jit_compiled_graph_runs_our_custom_calls_and_no_loop(xla_library, rng):
    ours, _ = _pair(return_sequences=True)
    hlo = _hlo(_compiled_step(ours), _data(rng))
    assert FORWARD in hlo and BACKWARD in hlo
    assert b" while(" not in hlo


def test_jit_compiled_fit_reduces_the_loss(xla_library, rng):
    model = keras.Sequential([keras.Input((T, D)), GatedLSTM(H), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
    x = rng.normal(size=(8, T, D)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None] / 10
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0]
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x), atol=TOL)


def _while_loop_hlo(rng):
    ours, _ = _pair(return_sequences=True)
    hlo = _hlo(_compiled_step(ours), _data(rng))
    return FORWARD not in hlo and b" while(" in hlo


def test_native_switched_off_keeps_the_while_loop_under_jit(monkeypatch, rng):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(_native_xla, "_state", {})
    monkeypatch.setenv("KERAS_LSTM_NATIVE", "0")
    assert _native_xla.xla_library() is None
    assert _while_loop_hlo(rng)


def test_xla_library_failure_falls_back_with_one_warning(xla_library, monkeypatch, tmp_path, rng):
    monkeypatch.setattr(_native_xla, "_state", {})
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match=r"under XLA \(jit_compile\) unavailable"):
        assert _native_xla.xla_library() is None
    assert _native_xla.xla_library() is None  # the failure is remembered: no second build
    # Outside XLA the main library still runs; under XLA, the while loop.
    assert _routes.native_reason() == ""
    assert _while_loop_hlo(rng)


def test_portable_ops_keep_tensorflow_ops_under_jit(xla_library, rng):
    ours, _ = _pair(return_sequences=True)
    step = _compiled_step(ours)
    args = _data(rng)
    with _routes.exporting():
        graph = step.get_concrete_function(*args).graph
    assert not [op for op in graph.get_operations() if op.type.startswith("KerasLstm")]


def test_mixed_float16_runs_the_custom_call_in_float32_under_jit(xla_library, rng):
    # The native kernel is float32: a mixed policy's float16 is cast in and out.
    layer = GatedLSTM(H, dtype="mixed_float16", return_sequences=True)
    layer.build((B, T, D))
    hlo = _hlo(_compiled_step(layer), _data(rng))
    assert FORWARD in hlo and b" while(" not in hlo
    assert b"f16[" in hlo and b"convert(" in hlo


_COUNT_WORKERS = """
import os, sys
import tensorflow as tf
if int(sys.argv[1]):
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
from keras_lstm import GatedLSTM
layer = GatedLSTM(4)
tf.function(layer, jit_compile=True)(tf.ones((8, 3, 2))).numpy()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(len(os.sched_getaffinity(0)), names.count("keras_lstm_xla"))
"""


@pytest.mark.parametrize("intra_op_threads", [0, 1], ids=["default", "one_thread"])
def test_custom_call_threads_follow_the_intra_op_setting(xla_library, intra_op_threads):
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_WORKERS, str(intra_op_threads)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cpus, workers = map(int, result.stdout.split()[-2:])
    # The calling thread takes one chunk; the pool holds the others.
    assert workers == (min(cpus, intra_op_threads) if intra_op_threads else cpus) - 1


@pytest.mark.parametrize("batch_major", [False, True])
def test_the_xla_ops_name_the_input_layout_they_expect(xla_library, batch_major):
    # A 2-D x reaches the XLA kernels' shape check: the error says which
    # layout x must have, as the TensorFlow kernels' does.
    module = _native.native_module()
    x, kernel = tf.zeros((4, 3)), tf.zeros((3, 8))
    mask, d_input, rows = tf.ones((4, 2)), tf.zeros((4, 2, 8)), tf.zeros((0,), tf.int32)
    expected = "(batch, T, D)" if batch_major else "(T, batch, D)"

    @tf.function(jit_compile=True)
    def dx(x):
        return module.keras_lstm_kept_input_grad(
            x, kernel, mask, d_input, rows, x_batch_major=batch_major
        )

    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(f"x must be {expected}")):
        dx(x)

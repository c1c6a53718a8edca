"""bfloat16 products in the native kernel (`mixed_bfloat16` on CPUs with AVX512-BF16).

The kernel's step products [x, h] [W; U] and dz U^T take bfloat16 operands
and sum in float32; everything else stays float32. A NumPy re-derivation that
rounds exactly those operands to bfloat16 (round to nearest even, as
vcvtne2ps2bf16 does) and computes the rest in float64 must agree with it to
float32 tolerance, forward and backward, eagerly and as the XLA custom call;
the same reference without the rounding must not, so a path that silently
kept float32 products fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, _internals, kernels
from keras_lstm.kernels import _build, _native

# Odd sizes: a pair of K straddles x and h, K and G H are odd-sized in the
# backward product, and N ends in a partial vector.
T, B, D, H = 7, 16, 5, 19


def _cpu_has_bf16() -> bool:
    return "avx512_bf16" in _build.cpu_features()


@pytest.fixture(scope="module")
def bf16_kernel():
    if not kernels.native_available():
        pytest.skip("no native kernel here (no g++ or an unsupported platform)")
    if not kernels.bf16_products():
        pytest.skip(
            "this CPU has no AVX512-BF16, so the kernel keeps float32 products here "
            "(test_bf16_products_name_the_instructions_of_this_cpu checks that; "
            "test_native_targets compiles the bfloat16 code for sapphirerapids)"
        )


def to_bf16(a):
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).copy()
    bits += np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (bits & np.uint32(0xFFFF0000)).view(np.float32)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def reference(data, rounded, recurrent_mask=None, weights_out=None):
    """Forward and backward of a plain LSTM in float64, with the two step
    products' operands rounded to bfloat16 when `rounded`. The loss is
    sum(h_seq * w_h) + sum(c_T), as `_loss` below. Returns h_seq, dh0, dc0."""
    x, kernel, bias, recurrent, h0, c0 = data
    r = to_bf16 if rounded else (lambda a: np.asarray(a, np.float32))
    rm = np.ones_like(h0) if recurrent_mask is None else recurrent_mask
    h, c = h0.astype(np.float64), c0.astype(np.float64)
    saved = []
    for t in range(T):
        h_in = (h * rm).astype(np.float32)
        z = (
            np.concatenate([r(x[t]), r(h_in)], axis=1).astype(np.float64)
            @ np.concatenate([r(kernel), r(recurrent)]).astype(np.float64)
            + bias
        )
        i, f, g, o = (
            _sigmoid(z[:, :H]),
            _sigmoid(z[:, H : 2 * H]),
            np.tanh(z[:, 2 * H : 3 * H]),
            _sigmoid(z[:, 3 * H :]),
        )
        c_prev = c
        c = f * c + i * g
        h = o * np.tanh(c)
        saved.append((i, f, g, o, c_prev, c, h))
    h_seq = np.stack([s[-1] for s in saved])
    w_h = weights_out
    dh, dc = np.zeros((B, H)), np.ones((B, H))
    for t in reversed(range(T)):
        i, f, g, o, c_prev, c, _ = saved[t]
        dh = dh + w_h
        tanh_c = np.tanh(c)
        dct = dc + dh * o * (1 - tanh_c**2)
        dz = np.concatenate(
            [
                dct * g * i * (1 - i),
                dct * c_prev * f * (1 - f),
                dct * i * (1 - g**2),
                dh * tanh_c * o * (1 - o),
            ],
            axis=1,
        )
        dc = dct * f
        dh = (r(dz.astype(np.float32)).astype(np.float64) @ r(recurrent).astype(np.float64).T) * rm
    return h_seq, dh, dc


def _data(rng):
    return (
        rng.normal(size=(T, B, D)).astype(np.float32),
        (rng.normal(size=(D, 4 * H)) * 0.4).astype(np.float32),
        (rng.normal(size=4 * H) * 0.1).astype(np.float32),
        (rng.normal(size=(H, 4 * H)) * 0.3).astype(np.float32),
        (rng.normal(size=(B, H)) * 0.5).astype(np.float32),
        (rng.normal(size=(B, H)) * 0.5).astype(np.float32),
    )


def _run(data, bf16, jit, recurrent_mask=None, weights_out=None):
    """h_seq and the gradients of (x, W, b, U, h0, c0) of the native op."""

    def step(*tensors):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            h_seq, _, _, c_last = _native.lstm_sequence(
                *tensors,
                recurrent_mask=None if recurrent_mask is None else tf.constant(recurrent_mask),
                bf16_products=bf16,
            )
            loss = tf.reduce_sum(h_seq * weights_out) + tf.reduce_sum(c_last)
        return h_seq, tape.gradient(loss, tensors)

    fn = tf.function(step, jit_compile=True) if jit else step
    h_seq, grads = fn(*[tf.constant(a) for a in data])
    return h_seq.numpy(), [g.numpy() for g in grads]


def test_bf16_products_name_the_instructions_of_this_cpu():
    if not kernels.native_available():
        pytest.skip("no native kernel here (no g++ or an unsupported platform)")
    flag_set = _native.load()[1]["flag_set"]
    expected = "avx512_bf16" if _cpu_has_bf16() and flag_set.startswith("native") else ""
    assert kernels.bf16_products() == expected


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("dropped", [False, True], ids=["plain", "recurrent_dropout"])
def test_forward_and_backward_match_a_reference_with_bfloat16_operands(
    bf16_kernel, rng, jit, dropped
):
    if jit and not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    data = _data(rng)
    weights_out = rng.normal(size=H).astype(np.float32)
    rmask = (rng.random((B, H)) > 0.3).astype(np.float32) / 0.7 if dropped else None
    h_seq, grads = _run(data, True, jit, rmask, weights_out)
    h_ref, dh0_ref, dc0_ref = reference(data, True, rmask, weights_out)
    np.testing.assert_allclose(h_seq, h_ref, atol=2e-5)
    np.testing.assert_allclose(grads[4], dh0_ref, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(grads[5], dc0_ref, atol=5e-5, rtol=1e-4)
    # Without the rounding the reference is measurably elsewhere: the products were bfloat16.
    h_f32, dh0_f32, _ = reference(data, False, rmask, weights_out)
    assert np.abs(h_seq - h_f32).max() > 1e-3
    assert np.abs(grads[4] - dh0_f32).max() > 1e-3


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_weight_gradients_stay_within_bfloat16_rounding_of_float32(bf16_kernel, rng, jit):
    if jit and not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    data = _data(rng)
    weights_out = rng.normal(size=H).astype(np.float32)
    _, exact = _run(data, False, jit, weights_out=weights_out)
    _, rounded = _run(data, True, jit, weights_out=weights_out)
    for name, a, b in zip(("x", "W", "b", "U", "h0", "c0"), exact, rounded, strict=True):
        error = np.abs(a - b).max() / np.abs(a).max()
        assert error < 3e-2, f"gradient of {name}: {error:.2e} from float32's"


# Eight worker threads cut a batch of 16 into blocks of 4 rows: every block
# must still take the bfloat16 products (the rule is the batch's, not a block's).
_EVERY_BLOCK = """
import sys
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(8)
sys.path.insert(0, sys.argv[1])
from test_bf16_products import _data
from keras_lstm.kernels import _native
data = [tf.constant(a) for a in _data(np.random.default_rng(0))]
exact = _native.lstm_sequence(*data)[0].numpy()
rounded = _native.lstm_sequence(*data, bf16_products=True)[0].numpy()
print(np.abs(exact - rounded).max(axis=(0, 2)).min())
"""


def test_every_row_block_takes_bf16_products_however_many_threads(bf16_kernel):
    result = subprocess.run(
        [sys.executable, "-c", _EVERY_BLOCK, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The smallest, over the batch's rows, of a row's largest change from float32's.
    assert float(result.stdout.split()[-1]) > 1e-4


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_weight_gradients_are_bfloat16_matmuls_outside_xla_only(bf16_kernel, rng, jit):
    data = [tf.constant(a) for a in _data(rng)]

    @tf.function(jit_compile=jit)
    def grads(*tensors):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = tf.reduce_sum(_native.lstm_sequence(*tensors, bf16_products=True)[0])
        return tape.gradient(loss, tensors)

    graph = grads.get_concrete_function(*data).graph
    bf16_matmuls = [
        op.name
        for op in graph.get_operations()
        if op.type == "MatMul" and op.get_attr("T") == tf.bfloat16
    ]
    # dx, dW, and dU's two products (later steps, and h0 with a nonzero one);
    # none under XLA or without oneDNN, where bfloat16 matmuls are no faster.
    assert len(bf16_matmuls) == (4 if not jit and _internals.onednn_enabled() else 0), bf16_matmuls


def test_a_batch_of_few_rows_keeps_float32_products(bf16_kernel, rng):
    # Up to 4 rows the step products are vector-matrix ones, which stay float32.
    data = [a[:, :2] if a.ndim == 3 else a for a in _data(rng)]
    data[4], data[5] = data[4][:2], data[5][:2]
    x, kernel, bias, recurrent, h0, c0 = (tf.constant(a) for a in data)
    exact = _native.lstm_sequence(x, kernel, bias, recurrent, h0, c0)[0]
    rounded = _native.lstm_sequence(x, kernel, bias, recurrent, h0, c0, bf16_products=True)[0]
    np.testing.assert_array_equal(exact.numpy(), rounded.numpy())


@pytest.mark.parametrize(
    "options",
    [{"cifg": True, "units": 21}, {"proj_units": 7, "peephole": True}, {"layer_norm": True}],
    ids=["cifg-odd-width", "projection-peephole", "layer_norm"],
)
def test_mixed_bfloat16_layer_with_options_runs_bf16_products_near_float32(
    bf16_kernel, rng, options
):
    options = dict(options)
    units = options.pop("units", H)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    layer32 = GatedLSTM(units, return_sequences=True, **options)
    out32 = layer32(x).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer16 = GatedLSTM(units, return_sequences=True, **options)
        layer16.build(x.shape)
        layer16.set_weights(layer32.get_weights())
        # The input rounded to bfloat16 by the policy; the rest is the kernel's.
        out16 = np.asarray(layer16(x), np.float32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    error = np.abs(out16 - out32).max()
    # Every value rounded once more to bfloat16 on the way out: within its step.
    assert error < 2e-2
    assert error > 0


def test_bf16_loss_benchmark_runs_and_compares_with_float32(tmp_path):
    from benchmarks import bf16_loss

    result = bf16_loss.main(
        ["--seeds", "2", "--epochs", "1", "--units", "8", "--out", str(tmp_path)]
    )
    saved = json.loads(Path(tmp_path, "bf16_loss.json").read_text())
    assert saved["epochs"] == json.loads(json.dumps(result["epochs"]))
    for dtype in ("float32", "mixed_bfloat16"):
        assert len(saved["runs"][dtype]) == 2
        assert all(np.isfinite(run["val_loss"][0]) for run in saved["runs"][dtype])
    assert keras.mixed_precision.global_policy().name == "float32"


def test_bf16_loss_benchmark_rejects_a_bad_count(capsys):
    from benchmarks import bf16_loss

    with pytest.raises(SystemExit):
        bf16_loss.main(["--seeds", "0"])
    assert "--seeds: must be a positive integer, got 0" in capsys.readouterr().err

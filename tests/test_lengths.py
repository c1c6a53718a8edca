"""Masked batches of unequal lengths in the native kernel.

The kernel orders a masked batch's rows by their number of kept steps and, at
each step, stops its work at the last row the mask keeps (lstm_core.h,
"Skipped rows"); the gradients are made from the kept steps alone. None of
this may change a result: outputs, final states and the gradients of the
inputs, the initial state and every weight must equal those of Keras's step
loop around the same cell (the reference, which knows nothing of the
ordering), in the caller's row order, for right-padded masks, their mirror
(left padding), a mask with holes, forwards and backwards, with every option,
under XLA, with bfloat16 products and with the batch split across threads.
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
from test_fused_options import (
    CLIP,
    PROJ,
    TOL,
    _FixedZoneout,
    _gradient_names,
    _outputs_and_grads,
    _twins,
)

from keras_lstm import GatedLSTM, kernels
from keras_lstm._routes import Route
from keras_lstm.kernels import _native

# 13 rows: two threads' blocks of 7 and 6 rows; lengths unsorted, one row
# full, one empty.
T, D, H = 9, 4, 6
LENGTHS = [3, 9, 1, 6, 0, 7, 2, 9, 5, 4, 8, 2, 6]
B = len(LENGTHS)


def _mask(kind, rng=None):
    steps = np.arange(T)[None, :]
    lengths = np.array(LENGTHS)[:, None]
    if kind == "right":  # right padding: a prefix a row
        return steps < lengths
    if kind == "left":  # its mirror: a suffix a row
        return steps >= T - lengths
    # Holes anywhere, and a last row that is masked at some steps only.
    return rng.uniform(size=(B, T)) < 0.6


def _assert_same(got, want, names):
    """Outputs and gradients agree to float32 tolerance of their own scale: the
    rows' order changes the order of the sums over rows in weight gradients."""
    for kind, a_list, b_list in (("output", got[0], want[0]), ("gradient", got[1], want[1])):
        assert len(a_list) == len(b_list)
        for k, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            what = names[k] if kind == "gradient" else f"output {k}"
            scale = max(1.0, float(np.abs(b).max())) if np.size(b) else 1.0
            np.testing.assert_allclose(
                a, b, atol=TOL * scale, rtol=TOL, err_msg=f"{kind} of {what}"
            )


def _data(rng, hidden=H):
    x = rng.normal(scale=1.5, size=(B, T, D)).astype("float32")
    h0 = rng.normal(size=(B, hidden)).astype("float32")
    c0 = rng.normal(size=(B, H)).astype("float32")
    return x, h0, c0


CELL_OPTIONS = [
    {},
    {"peephole": True},
    {"cifg": True},
    {"cell_clip": CLIP},
    {"proj_units": PROJ},
    {"layer_norm": True},
    {"layer_norm": True, "peephole": True, "cifg": True, "cell_clip": CLIP, "proj_units": PROJ},
]
CELL_IDS = ["+".join(options) or "plain" for options in CELL_OPTIONS]
MASKS = [("right", False), ("left", True), ("right", True), ("random", False)]
MASK_IDS = ["right", "left-backwards", "right-backwards", "random"]


def _cases():
    """Right padding forwards and its mirror backwards for each option; the
    rest (right padding backwards, holes) for the plain cell and all options
    together by default, for each option in the slow suite."""
    for options, cell_id in zip(CELL_OPTIONS, CELL_IDS, strict=True):
        for (kind, backwards), mask_id in zip(MASKS, MASK_IDS, strict=True):
            default = mask_id in ("right", "left-backwards") or cell_id in (
                "plain",
                CELL_IDS[-1],
            )
            marks = () if default else (pytest.mark.slow,)
            yield pytest.param(options, kind, backwards, id=f"{mask_id}-{cell_id}", marks=marks)


@pytest.fixture(autouse=True)
def _native_only():
    if not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no g++ or no TF headers)")


@pytest.mark.parametrize("cell_options, kind, backwards", list(_cases()))
def test_unequal_lengths_match_the_cells_own_loop(rng, fused_calls, cell_options, kind, backwards):
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    mask = _mask(kind, rng)
    fused, generic = _twins(
        rng, return_sequences=True, return_state=True, go_backwards=backwards, **cell_options
    )
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=False)
    assert fused_calls, "the fused op did not run"
    fused_calls.clear()
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=False)
    assert not fused_calls, "the reference must run Keras's step loop"
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize("cell_options", [{}, {"layer_norm": True}], ids=["plain", "layer_norm"])
def test_a_few_unequal_rows_match_the_cells_own_loop(rng, fused_calls, cell_options):
    # Three rows (lengths 3, 9, 1) make one block, which projects every step's
    # input first (or, with layer norm, apart each step): the kernel reads x
    # through the rows' sorted order there too.
    x, h0, c0 = (v[:3] for v in _data(rng))
    mask = _mask("right")[:3]
    fused, generic = _twins(rng, return_sequences=True, return_state=True, **cell_options)
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=False)
    assert fused_calls, "the fused op did not run"
    fused_calls.clear()
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=False)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize(
    "cell_options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"layer_norm": True, "proj_units": PROJ}, id="layer_norm+proj_units"),
        pytest.param({"peephole": True, "cifg": True}, id="peephole+cifg", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("kind", ["right", "random"])
def test_unequal_lengths_with_dropouts_match(rng, fused_calls, cell_options, kind):
    # Input and recurrent dropout: both layers draw the same masks, which
    # follow the rows to their places in the kernel.
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    fused, generic = _twins(
        rng, dropout=0.2, recurrent_dropout=0.3, seed=3, return_state=True, **cell_options
    )
    mask = _mask(kind, rng)
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=True)
    assert fused_calls
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=True)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize("backwards", [False, True], ids=["forwards", "backwards"])
@pytest.mark.parametrize(
    "cell_options",
    [
        {"zoneout_h": 0.3, "zoneout_c": 0.2, "peephole": True, "proj_units": PROJ},
        {"zoneout_h": 0.3, "zoneout_c": 0.2, "layer_norm": True, "cell_clip": CLIP},
    ],
    ids=["zoneout+peephole+proj_units", "zoneout+layer_norm+cell_clip"],
)
def test_unequal_lengths_with_zoneout_match(rng, fused_calls, cell_options, backwards):
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    fused, generic = _twins(
        rng, return_sequences=True, return_state=True, go_backwards=backwards, **cell_options
    )
    generic.unroll = True  # one cell call a step, in order: the masks are taken in turn
    hidden = cell_options.get("proj_units", H)
    masks = {
        "h": (rng.uniform(size=(T, B, hidden)) < 0.3).astype("float32"),
        "c": (rng.uniform(size=(T, B, H)) < 0.2).astype("float32"),
    }
    fused._zoneout_masks = lambda state, steps_and_batch: masks[state]
    generic.cell._zoneout = _FixedZoneout(masks["h"], masks["c"])
    mask = _mask("right")
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=True)
    assert fused_calls and fused_calls[-1].zoneout_h is not None
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=True)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_bidirectional_with_unequal_lengths_matches(rng, fused_calls, merge_mode):
    # The backward half reads the right-padded mask reversed: a suffix a row.
    x, _, _ = _data(rng)
    options = {"return_sequences": True, "peephole": True}
    fused = keras.layers.Bidirectional(GatedLSTM(H, **options), merge_mode=merge_mode)
    generic = keras.layers.Bidirectional(GatedLSTM(H, **options), merge_mode=merge_mode)
    fused.build((B, T, D))
    generic.build((B, T, D))
    weights = [rng.normal(scale=0.6, size=w.shape).astype("float32") for w in fused.get_weights()]
    fused.set_weights(weights)
    generic.set_weights(weights)
    for half in (generic.forward_layer, generic.backward_layer):
        half._pinned_route = Route.STEP_LOOP
    mask = tf.constant(_mask("right"))

    def outputs_and_grads(layer):
        xs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            out = layer(xs, mask=mask)
            loss = tf.reduce_sum(out * out * tf.range(1.0, out.shape[-1] + 1.0))
        grads = tape.gradient(loss, [xs, *layer.trainable_weights])
        return [np.asarray(out)], [np.asarray(g) for g in grads]

    got = outputs_and_grads(fused)
    assert len(fused_calls) == 2, "both halves must run fused"
    fused_calls.clear()
    want = outputs_and_grads(generic)
    assert not fused_calls
    _assert_same(got, want, ["x", *(w.path for w in fused.trainable_weights)])


@pytest.mark.parametrize(
    "cell_options, kind, backwards",
    [
        pytest.param({}, "right", False, id="plain-right"),
        pytest.param({}, "left", True, id="plain-left-backwards"),
        pytest.param(CELL_OPTIONS[-1], "right", False, id="all-right"),
        pytest.param(CELL_OPTIONS[-1], "random", True, id="all-random", marks=pytest.mark.slow),
        pytest.param(
            {"peephole": True}, "right", True, id="peephole-right-backwards", marks=pytest.mark.slow
        ),
    ],
)
def test_unequal_lengths_under_xla_match(rng, fused_calls, cell_options, kind, backwards):
    if not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    mask = _mask(kind, rng)
    fused, generic = _twins(
        rng, return_sequences=True, return_state=True, go_backwards=backwards, **cell_options
    )
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=True, jit=True)
    assert fused_calls
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=True, jit=True)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize(
    "cell_options",
    [{}, {"layer_norm": True}, CELL_OPTIONS[-1]],
    ids=["plain", "layer_norm", "all"],
)
@pytest.mark.parametrize(
    "kind, backwards",
    [("right", False), ("left", True), ("random", False)],
    ids=["right", "left-backwards", "random"],
)
@pytest.mark.parametrize("jit", [None, True], ids=["eager", "xla"])
def test_the_final_state_in_training_is_each_rows_own(
    rng, fused_calls, cell_options, kind, backwards, jit
):
    # Training without return_sequences: the kept sequences stop carrying a
    # row's state on after its last real step, so the final state is taken
    # from that step (or from h0 and c0 for an empty row), gradients included.
    if jit and not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    mask = _mask(kind, rng)
    fused, generic = _twins(rng, return_state=True, go_backwards=backwards, **cell_options)
    got = _outputs_and_grads(fused, x, h0, c0, mask, training=True, jit=jit)
    assert fused_calls, "the fused op did not run"
    want = _outputs_and_grads(generic, x, h0, c0, mask, training=True)
    _assert_same(got, want, _gradient_names(fused))


def _recurrence_per_row(rng, kind, bf16, jit):
    """The fused op on the masked batch against each row alone (in a batch of
    copies, unmasked, cut to its length): outputs at the kept steps, final
    states, and the gradients of x, h0, c0, the kernels and the bias."""
    lengths = np.array(LENGTHS)
    mask = _mask(kind)
    x, h0, c0 = _data(rng)
    kernel = rng.normal(scale=0.5, size=(D, 4 * H)).astype("float32")
    recurrent = rng.normal(scale=0.5, size=(H, 4 * H)).astype("float32")
    bias = rng.normal(scale=0.5, size=(4 * H,)).astype("float32")
    backwards = kind == "left"

    def run(x, h0, c0, kernel, recurrent, bias, mask, weights):
        # weights (B, T): which outputs the loss reads.
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0, kernel, recurrent, bias])
            sequence = kernels.Sequence(
                x, kernel, recurrent, bias, h0, c0, mask=mask, bf16_products=bf16
            )
            route = "native_xla" if jit else "native"
            _, outputs, (h, c) = kernels.lstm_recurrence(route, sequence, go_backwards=backwards)
            ramp = tf.range(1.0, H + 1.0) / H
            loss = tf.reduce_sum(weights[:, :, None] * outputs * outputs * ramp)
            loss += tf.reduce_sum(weights[:, :1] * (h * h + c) * ramp)
        grads = tape.gradient(loss, [x, h0, c0, kernel, recurrent, bias])
        return outputs, h, c, grads

    run = tf.function(run, jit_compile=jit)
    # Outputs come in processing order (reversed with go_backwards): there
    # the kept steps come first, for right padding and for its mirror backwards.
    kept_first = np.arange(T)[None, :] < lengths[:, None]
    got = run(x, h0, c0, kernel, recurrent, bias, mask, kept_first.astype("float32"))
    sums = {"kernel": 0, "recurrent": 0, "bias": 0}
    copies = 6  # more than 4 rows: the batch's bfloat16 products run
    for row, length in enumerate(LENGTHS):
        if length == 0:  # a row the mask drops whole keeps its initial state
            np.testing.assert_array_equal(got[1][row], h0[row])
            np.testing.assert_array_equal(got[2][row], c0[row])
            assert not np.asarray(got[3][0][row]).any()
            continue
        steps = x[row : row + 1, T - length :] if backwards else x[row : row + 1, :length]
        xr = np.repeat(steps, copies, axis=0)
        weights = np.zeros((copies, length), "float32")
        weights[0] = 1.0
        out, h, c, grads = run(
            xr,
            np.repeat(h0[row : row + 1], copies, 0),
            np.repeat(c0[row : row + 1], copies, 0),
            kernel,
            recurrent,
            bias,
            None,
            weights,
        )
        np.testing.assert_allclose(got[1][row], h[0], atol=TOL, rtol=TOL, err_msg=f"h of {row}")
        np.testing.assert_allclose(got[2][row], c[0], atol=TOL, rtol=TOL, err_msg=f"c of {row}")
        np.testing.assert_allclose(
            np.asarray(got[0][row, :length]), out[0], atol=TOL, rtol=TOL, err_msg=f"row {row}"
        )
        dx = np.zeros((T, D), "float32")
        kept_x = np.asarray(grads[0][0])
        if backwards:
            dx[T - length :] = kept_x
        else:
            dx[:length] = kept_x
        np.testing.assert_allclose(got[3][0][row], dx, atol=TOL, rtol=TOL, err_msg=f"dx of {row}")
        for k, name in ((1, "dh0"), (2, "dc0")):
            np.testing.assert_allclose(
                got[3][k][row], grads[k][0], atol=TOL, rtol=TOL, err_msg=f"{name} of {row}"
            )
        for k, name in ((3, "kernel"), (4, "recurrent"), (5, "bias")):
            sums[name] = sums[name] + np.asarray(grads[k], "float64")
    # The weight gradients sum over rows (in another order here); with
    # bfloat16 products their matmuls return bfloat16 sums (_gradients.matmul).
    for k, name in ((3, "kernel"), (4, "recurrent"), (5, "bias")):
        scale = float(np.abs(sums[name]).max())
        tolerance = 1e-2 * scale if bf16 and name != "bias" else 1e-5 * max(1.0, scale)
        np.testing.assert_allclose(got[3][k], sums[name], atol=tolerance, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "bf16",
    [
        pytest.param(False, id="float32"),
        pytest.param(True, id="bf16_products"),
    ],
)
@pytest.mark.parametrize("kind", ["right", "left"])
def test_each_row_matches_itself_alone(rng, kind, bf16):
    # With bfloat16 products too: each row's products round the same operands
    # whichever rows share its step, so a row alone is its own reference.
    if bf16 and not kernels.bf16_products():
        pytest.skip("no AVX512-BF16 here: the kernel keeps float32 products")
    _recurrence_per_row(rng, kind, bf16, jit=False)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16_products"])
def test_each_row_matches_itself_alone_under_xla(rng, bf16):
    if not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    if bf16 and not kernels.bf16_products():
        pytest.skip("no AVX512-BF16 here: the kernel keeps float32 products")
    _recurrence_per_row(rng, "right", bf16, jit=True)


def test_mixed_bfloat16_masked_layer_stays_near_float32(rng):
    x, h0, c0 = _data(rng)
    mask = _mask("right")
    layer32 = GatedLSTM(H, return_sequences=True, peephole=True)
    out32 = np.asarray(layer32(x, mask=mask))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer16 = GatedLSTM(H, return_sequences=True, peephole=True)
        layer16.build(x.shape)
        layer16.set_weights(layer32.get_weights())
        out16 = np.asarray(layer16(x, mask=mask), np.float32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Each row in its place: a row swapped with another would be far off.
    assert np.abs(out16 - out32).max() < 2e-2


def _blocks(batch):
    """The blocks the ops split `batch` rows into here (lstm_sequence.cc's NumChunks)."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    threads = threads if threads > 0 else len(os.sched_getaffinity(0))
    return max(1, min(threads, batch // 4))


def _slowest_block(lengths, blocks):
    """The slowest block's cost (lstm_core.h's StepCost over its steps) of lengths in blocks."""
    few = [0.0, 2.0, 2.4, 3.2, 4.1]
    worst = 0.0
    for block in blocks:
        block = sorted(block, reverse=True)
        cost = sum(
            (n if n >= 5 else few[n]) * (block[n - 1] - (block[n] if n < len(block) else 0))
            for n in range(1, len(block) + 1)
        )
        worst = max(worst, cost)
    return worst


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "lengths",
    [
        LENGTHS,
        [round(v) for v in np.geomspace(10, 2000, 32)],  # benchmarks.lengths's wide batch
        [7] * 13,
        [5, 0, 3, 0, 9, 9, 1, 2],
    ],
)
def test_row_order_sorts_each_threads_block_by_length(lengths, jit):
    batch = len(lengths)
    lengths_t = tf.constant(lengths, tf.float32)
    steps = max(lengths)
    mask = tf.cast(tf.range(steps, dtype=tf.float32)[:, None] < lengths_t[None, :], tf.float32)
    order, inverse, sorted_mask = (
        np.asarray(t) for t in tf.function(_native._row_order, jit_compile=jit)(mask)
    )
    assert sorted(order) == list(range(batch))
    np.testing.assert_array_equal(order[inverse], np.arange(batch))
    assert sorted_mask.dtype == np.float32
    np.testing.assert_array_equal(sorted_mask, np.asarray(mask)[:, order])
    per_block = -(-batch // _blocks(batch))
    ordered = np.array(lengths)[order]
    blocks = [list(ordered[start : start + per_block]) for start in range(0, batch, per_block)]
    for block in blocks:
        assert block == sorted(block, reverse=True)
    # The blocks are no slower than the sorted rows dealt to them in turn.
    ranked = sorted(lengths, reverse=True)
    dealt = [ranked[k :: len(blocks)] for k in range(len(blocks))]
    assert _slowest_block(lengths, blocks) <= _slowest_block(lengths, dealt) + 1e-6


def test_row_order_balances_the_wide_batch():
    # 32 rows of 10 to 2,000 steps over two threads: the slowest block's
    # cost is within 2 % of the two blocks' mean (dealt in turn: 8.5 % over).
    if _blocks(32) != 2:
        pytest.skip("this machine splits a batch of 32 rows over other than two threads")
    lengths = [round(v) for v in np.geomspace(10, 2000, 32)]
    mask = tf.cast(tf.range(max(lengths))[:, None] < tf.constant(lengths)[None, :], tf.float32)
    order = np.asarray(_native._row_order(mask)[0])
    ordered = np.array(lengths)[order]
    blocks = [list(ordered[:16]), list(ordered[16:])]
    mean = sum(_slowest_block(lengths, [b]) for b in blocks) / 2
    assert _slowest_block(lengths, blocks) <= 1.02 * mean


SUBPROCESS = """
import json, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
from keras_lstm import kernels
rng = np.random.default_rng(0)
lengths = np.array(json.loads(sys.argv[2]))
B, T, D, H = len(lengths), int(lengths.max()), 3, 5
x = rng.normal(size=(B, T, D)).astype("float32")
mask = np.arange(T)[None, :] < lengths[:, None]
w = [rng.normal(scale=0.5, size=s).astype("float32") for s in ((D, 4 * H), (H, 4 * H), (4 * H,))]
zeros = np.zeros((B, H), "float32")
out = {}
for name, m in (("masked", mask), ("alone", None)):
    rows = []
    for row in range(B) if m is None else [None]:
        xr = x if row is None else np.repeat(x[row : row + 1, : lengths[row]], 5, axis=0)
        z = zeros if row is None else np.zeros((5, H), "float32")
        with tf.GradientTape() as tape:
            ws = [tf.constant(v) for v in w]
            tape.watch(ws)
            sequence = kernels.Sequence(xr, ws[0], ws[1], ws[2], z, z, mask=m)
            last, _, _ = kernels.lstm_recurrence("native", sequence)
            loss = tf.reduce_sum(last[:1] if row is not None else last)
        grads = [np.asarray(g).tolist() for g in tape.gradient(loss, ws)]
        rows.append([np.asarray(last).tolist(), grads])
    out[name] = rows
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_threads_split_a_sorted_batch_without_changing_it(threads):
    # 23 rows over 1, 3 or 5 intra-op threads (blocks of unequal sizes): each
    # row's last output and the weight gradients equal each row run alone.
    lengths = [17, 3, 40, 1, 22, 9, 40, 5, 12, 30, 2, 8, 19, 26, 4, 11, 33, 6, 15, 7, 1, 28, 10]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, str(threads), json.dumps(lengths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ((masked_last, masked_grads),) = result["masked"]
    sums = None
    for row, (last, grads) in enumerate(result["alone"]):
        np.testing.assert_allclose(masked_last[row], last[0], atol=TOL, rtol=TOL)
        grads = [np.asarray(g) for g in grads]
        sums = grads if sums is None else [s + g for s, g in zip(sums, grads, strict=True)]
    for got, want in zip(masked_grads, sums, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_lengths_benchmark_runs_at_tiny_sizes(tmp_path):
    from benchmarks import lengths

    assert lengths.main(["--quick", "--rounds", "1", "--no-torch", "--out", str(tmp_path)]) == 0
    saved = json.loads(Path(tmp_path, "lengths.json").read_text())
    assert [run["batch"] for run in saved["runs"]] == ["lognormal", "wide"]
    for run in saved["runs"]:
        assert set(run["rows"]) == set(lengths.ROWS) - {r for r in lengths.ROWS if "torch" in r}
        assert run["rows"][lengths.REFERENCE]["train_ratio"] == 1.0
        assert all(row["infer_ms"] > 0 for row in run["rows"].values())


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_recurrence_by_lengths_is_the_masked_recurrence(kind):
    # ONNX exports of a masked layer run each row over its kept steps gathered
    # to its front (ONNX's LSTM op with sequence_lens); that must be the masked
    # loop's result for every mask, non-zero initial states included.
    from keras_lstm.kernels import _while_loop

    rng = np.random.default_rng(3)
    x, h0, c0 = _data(rng)
    mask = _mask(kind, rng)
    kernel = rng.normal(scale=0.4, size=(D, 4 * H)).astype("float32")
    recurrent_kernel = rng.normal(scale=0.4, size=(H, 4 * H)).astype("float32")
    bias = rng.normal(size=(4 * H,)).astype("float32")
    time_major = tf.transpose(x, (1, 0, 2)), tf.transpose(mask)
    arguments = (kernel, bias, recurrent_kernel, h0, c0)
    got = _while_loop.lstm_sequence_by_lengths(time_major[0], *arguments, time_major[1])
    want = _while_loop.lstm_sequence_for_inference(time_major[0], *arguments, mask=time_major[1])
    for a, b, what in zip(got, want, ("h_seq", "h_last", "c_last"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("kind", ["right", "holes", "none_kept"])
@pytest.mark.parametrize("dropped", [False, True], ids=["", "recurrent_mask"])
@pytest.mark.parametrize("apart", [False, True], ids=["dz", "layer_norm"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("layout", ["", "x_rows", "batch_major", "batch_major_reversed_x_rows"])
def test_kept_step_gradients_are_those_of_the_kept_steps(kind, dropped, apart, jit, layout):
    # The native op behind masked gradients: dx = d_input W^T at the kept
    # steps, zeros elsewhere, and the weights' gradients summed over the kept
    # steps only, with h_{t-1} (times r with recurrent dropout) the state the
    # step started from. Enough steps that the sum is split across threads.
    # With x_rows the kernel's row b is x's row x_rows[b], for x and dx; x
    # (and dx) may be batch-major, and its steps reversed.
    permuted = "x_rows" in layout
    module = _native.native_module()  # the module's `_native_only` skips where there is none
    rng = np.random.default_rng(5)
    steps, batch, features, hidden, width = 90, 12, 3, 5, 20
    x = rng.normal(size=(steps, batch, features)).astype("float32")
    kernel = rng.normal(size=(features, width)).astype("float32")
    h0 = rng.normal(size=(batch, hidden)).astype("float32")
    h_seq = rng.normal(size=(steps, batch, hidden)).astype("float32")
    d_input = rng.normal(size=(steps, batch, width)).astype("float32")
    d_recurrent = rng.normal(size=(steps, batch, width)).astype("float32") if apart else d_input
    r = (rng.random((batch, hidden)) < 0.7).astype("float32") / 0.7 if dropped else None
    if kind == "right":
        mask = np.arange(steps)[:, None] < rng.integers(1, steps, batch)[None, :]
    elif kind == "holes":
        mask = rng.random((steps, batch)) < 0.6
    else:
        mask = np.zeros((steps, batch), bool)
    mask = mask.astype("float32")

    x_rows = rng.permutation(batch).astype("int32") if permuted else np.arange(batch)
    x_in_kernel_order = x[:, x_rows]
    h_prev = np.concatenate([h0[None], h_seq[:-1]])
    if dropped:
        h_prev = h_prev * r
    kept = mask[..., None]
    want_dx = np.empty_like(x)
    want_dx[:, x_rows] = (d_input @ kernel.T) * kept
    want_dkernel = np.einsum("tbd,tbg->dg", x_in_kernel_order * kept, d_input)
    want_drecurrent = np.einsum("tbr,tbg->rg", h_prev * kept, d_recurrent)

    batch_major, reversed_ = "batch_major" in layout, "reversed" in layout

    def as_given(seq):  # time-major in the kernel's step order -> the layout x comes in
        seq = seq[::-1] if reversed_ else seq
        return np.ascontiguousarray(seq.transpose(1, 0, 2) if batch_major else seq)

    x, want_dx = as_given(x), as_given(want_dx)
    empty = tf.zeros((0,))

    def grads(x, kernel, h0, h_seq, mask, r, d_input, d_recurrent, x_rows):
        layout = {"x_batch_major": batch_major, "x_reversed": reversed_}
        dx = module.keras_lstm_kept_input_grad(x, kernel, mask, d_input, x_rows, **layout)
        weights = module.keras_lstm_kept_grads(
            x, kernel, h0, h_seq, mask, r, d_input, d_recurrent, x_rows, **layout
        )
        return (dx, *weights)

    if jit:
        grads = tf.function(grads, jit_compile=True)
    got = grads(
        x,
        kernel,
        h0,
        h_seq,
        mask,
        empty if r is None else r,
        d_input,
        d_recurrent if apart else empty,
        x_rows if permuted else tf.zeros((0,), tf.int32),
    )
    for value, expected, what in zip(
        got, (want_dx, want_dkernel, want_drecurrent), ("dx", "dkernel", "drecurrent"), strict=True
    ):
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4, err_msg=what)


@pytest.mark.parametrize("batch", [3, 12], ids=["few_rows", "rows"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["", "layer_norm"])
@pytest.mark.parametrize("bf16", [False, True], ids=["", "bf16_products"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_the_kernel_reads_x_where_it_is(batch, masked, layer_norm, bf16, jit):
    # x as Keras hands it over, (B, T, D), its steps read backwards and its
    # rows through x_rows, gives the same outputs as the same x made
    # time-major, reversed and gathered first, and its gradient is that one's
    # brought back to x's layout; so do the weights' gradients.
    module = _native.native_module()  # the module's `_native_only` skips where there is none
    if bf16 and not _native.bf16_products():
        pytest.skip("this CPU has no bfloat16 products")
    rng = np.random.default_rng(11)
    steps, features, units = 23, 5, 7
    x = tf.constant(rng.normal(size=(batch, steps, features)).astype("float32"))
    kernel = tf.constant(rng.normal(size=(features, 4 * units)).astype("float32") * 0.3)
    recurrent = tf.constant(rng.normal(size=(units, 4 * units)).astype("float32") * 0.3)
    bias = tf.constant(rng.normal(size=(4 * units,)).astype("float32"))
    h0 = tf.constant(rng.normal(size=(batch, units)).astype("float32"))
    c0 = tf.constant(rng.normal(size=(batch, units)).astype("float32"))
    lengths = rng.integers(0, steps + 1, batch)
    order = np.argsort(-lengths, kind="stable").astype("int32")
    # The kernel's row b is x's row order[b]; its mask is time-major, in the order steps run.
    mask = (np.arange(steps)[:, None] < lengths[order][None, :]).astype("float32")
    empty = tf.zeros((0,))
    gains = tf.constant(rng.normal(size=(10 * units,)).astype("float32")) if layer_norm else empty
    h0_k, c0_k = tf.gather(h0, order), tf.gather(c0, order)

    def run(x, kernel, recurrent, given):
        x_rows = order if masked and given else tf.zeros((0,), tf.int32)
        if not given:  # made time-major, reversed and gathered first
            x = tf.reverse(tf.transpose(x, (1, 0, 2)), [0])
            x = tf.gather(x, order, axis=1) if masked else x
        h0_, c0_ = (h0_k, c0_k) if masked else (h0, c0)
        h_seq, _, _, h_last, _, _, _ = module.keras_lstm_sequence(
            x,
            kernel,
            bias,
            recurrent,
            h0_,
            c0_,
            mask if masked else empty,
            empty,
            empty,
            empty,
            empty,
            empty,
            gains,
            x_rows,
            x_batch_major=given,
            x_reversed=given,
            bf16_products=bf16,
        )
        return h_seq, h_last

    def outputs_and_grads(given):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, recurrent])
            h_seq, h_last = run(x, kernel, recurrent, given)
            loss = tf.reduce_sum(h_seq * h_seq[::-1]) + tf.reduce_sum(h_last)
        return [h_seq, h_last], tape.gradient(loss, [x, kernel, recurrent])

    if jit:
        outputs_and_grads = tf.function(outputs_and_grads, jit_compile=True)
    got, want = outputs_and_grads(True), outputs_and_grads(False)
    for a, b, what in zip(
        got[0] + got[1], want[0] + want[1], ("h_seq", "h_last", "dx", "dW", "dU"), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)

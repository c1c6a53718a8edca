"""The cell options the native kernel computes (peephole, cifg, cell_clip, proj_units,
zoneout_h, zoneout_c, layer_norm) match the cell.

A `GatedLSTM` with these options runs the fused native op (eagerly, in a
graph, and as the XLA custom call); its twin with the same weights runs
Keras's step loop around `GatedLSTMCell.call`, the reference. Outputs, final
states and the gradients of the inputs, the initial state and every weight
(the peephole weights included) agree to 1e-5, with masks, backwards, and
input and recurrent dropout (both draw the same masks). Zoneout in training
draws a fresh mask a step; the tests hand both paths the same masks.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, _routes, kernels
from keras_lstm._routes import Route

B, T, D, H = 5, 7, 4, 6
TOL = 1e-5
CLIP = 0.8

MASK = np.array(
    [
        [1, 1, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 0, 1, 0, 1, 0, 1],
    ],
    dtype=bool,
)

PROJ = 3
# Each option alone, some pairs, all four at once, and layer norm alone, with
# every other option, and without a bias (so without the cell norm's shift).
CELL_OPTIONS = [
    {"peephole": True},
    {"cifg": True},
    {"cell_clip": CLIP},
    {"proj_units": PROJ},
    {"peephole": True, "cifg": True},
    {"cifg": True, "proj_units": PROJ},
    {"cell_clip": CLIP, "proj_units": PROJ},
    {"peephole": True, "cifg": True, "cell_clip": CLIP, "proj_units": PROJ},
    {"layer_norm": True},
    {"layer_norm": True, "peephole": True, "cifg": True, "cell_clip": CLIP, "proj_units": PROJ},
    {"layer_norm": True, "use_bias": False},
]
CELL_IDS = ["+".join(options) for options in CELL_OPTIONS]

LAYER_OPTIONS = [
    {"return_sequences": True, "return_state": True},
    {"return_sequences": True, "go_backwards": True, "return_state": True},
    {"return_sequences": False, "dropout": 0.2, "recurrent_dropout": 0.3, "seed": 3},
]
LAYER_IDS = ["sequences", "backwards", "last_with_dropouts"]


@pytest.fixture(autouse=True)
def _native_only():
    if not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no g++ or no TF headers)")


def _twins(rng, **kwargs):
    """A fused layer and its step-loop twin, with the same random weights."""
    fused, generic = GatedLSTM(H, **kwargs), GatedLSTM(H, **kwargs)
    fused.build((B, T, D))
    generic.build((B, T, D))
    # Random weights, peepholes included (they start at zero), large enough
    # that the cell state reaches the clip.
    weights = [rng.normal(scale=0.6, size=w.shape).astype("float32") for w in fused.get_weights()]
    fused.set_weights(weights)
    generic.set_weights(weights)
    generic._pinned_route = Route.STEP_LOOP
    return fused, generic


def _data(rng, hidden=H):
    x = rng.normal(scale=1.5, size=(B, T, D)).astype("float32")
    h0 = rng.normal(size=(B, hidden)).astype("float32")
    c0 = rng.normal(size=(B, H)).astype("float32")
    return x, h0, c0


def _ramp(o):
    size = tf.size(o)
    return tf.reshape(tf.cast(tf.range(1, size + 1), o.dtype) / tf.cast(size, o.dtype), o.shape)


def _outputs_and_grads(layer, x, h0, c0, mask, training, jit=None):
    def run(x, h0, c0):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            out = layer(x, initial_state=[h0, c0], mask=mask, training=training)
            outs = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(tf.reduce_sum(_ramp(o) * o * o) for o in outs)
        return outs, tape.gradient(loss, [x, h0, c0, *layer.trainable_weights])

    if jit is not None:
        run = tf.function(run, jit_compile=jit)
    outs, grads = run(tf.constant(x), tf.constant(h0), tf.constant(c0))
    return [np.asarray(o) for o in outs], [np.asarray(g) for g in grads]


def _assert_same(got, want, names):
    for kind, a_list, b_list in (("output", got[0], want[0]), ("gradient", got[1], want[1])):
        assert len(a_list) == len(b_list)
        for k, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            what = names[k] if kind == "gradient" else f"output {k}"
            np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"{kind} of {what}")


def _gradient_names(layer):
    return ["x", "h0", "c0", *(w.path.rsplit("/", 1)[-1] for w in layer.trainable_weights)]


def _slow_unless(default):
    return () if default else (pytest.mark.slow,)


def _parity_cases():
    """Each option alone and all four together in every set-up, masked and not;
    a pair, or layer norm with others, only masked, backwards and with dropouts
    (every set-up in the slow suite)."""
    for cell_options, cell_id in zip(CELL_OPTIONS, CELL_IDS, strict=True):
        # Pairs, and layer norm with others, run masked set-ups by default.
        some = len(cell_options) == 2 or (len(cell_options) > 1 and "layer_norm" in cell_options)
        for layer_options, layer_id in zip(LAYER_OPTIONS, LAYER_IDS, strict=True):
            for masked in (False, True):
                default = not some or (masked and layer_id != "sequences")
                yield pytest.param(
                    cell_options,
                    layer_options,
                    masked,
                    id=f"{'masked' if masked else 'unmasked'}-{cell_id}-{layer_id}",
                    marks=_slow_unless(default),
                )


@pytest.mark.parametrize("cell_options, layer_options, masked", list(_parity_cases()))
def test_options_run_fused_and_match_the_cells_own_loop(
    rng, fused_calls, cell_options, layer_options, masked
):
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    fused, generic = _twins(rng, **cell_options, **layer_options)
    mask = MASK if masked else None
    training = "dropout" in layer_options
    got = _outputs_and_grads(fused, x, h0, c0, mask, training)
    assert fused_calls and fused_calls[-1] is not None, "the options did not run fused"
    assert fused_calls[-1].cifg == ("cifg" in cell_options)
    assert (fused_calls[-1].projection is not None) == ("proj_units" in cell_options)
    assert (fused_calls[-1].peephole is not None) == ("peephole" in cell_options)
    assert (fused_calls[-1].layer_norm is not None) == ("layer_norm" in cell_options)
    fused_calls.clear()
    want = _outputs_and_grads(generic, x, h0, c0, mask, training)
    assert not fused_calls, "the reference must run Keras's step loop"
    _assert_same(got, want, _gradient_names(fused))


def _assert_agree_under_xla(rng, fused, generic, cell_options):
    """The twins' outputs and gradients in a training step compiled by XLA, masked."""
    if not kernels.native_available(jit_compile=True):
        pytest.skip("the native kernel's XLA library cannot be built here")
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    got = _outputs_and_grads(fused, x, h0, c0, MASK, training=True, jit=True)
    want = _outputs_and_grads(generic, x, h0, c0, MASK, training=True, jit=True)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize(
    "cell_options",
    [
        pytest.param(options, id=name, marks=_slow_unless(len(options) != 2))
        for options, name in zip(CELL_OPTIONS, CELL_IDS, strict=True)
    ],
)
def test_options_under_xla_match_the_cells_own_loop(rng, fused_calls, cell_options):
    fused, generic = _twins(rng, return_sequences=True, return_state=True, **cell_options)
    _assert_agree_under_xla(rng, fused, generic, cell_options)
    assert fused_calls and fused_calls[-1] is not None


def test_the_clip_clips_and_stops_the_gradient_where_it_does(rng):
    # The weights above drive the cell state past the clip somewhere, and not everywhere.
    x, h0, c0 = _data(rng)
    fused, generic = _twins(rng, cell_clip=CLIP, return_sequences=True, return_state=True)
    _, _, c_last = fused(x, initial_state=[h0, c0])
    at_clip = np.isclose(np.abs(np.asarray(c_last)), CLIP, atol=1e-6)
    assert at_clip.any() and not at_clip.all()
    np.testing.assert_allclose(
        np.asarray(generic(x, initial_state=[h0, c0])[2]), np.asarray(c_last), atol=TOL
    )


def test_a_batch_split_across_threads_matches(rng, fused_calls):
    # 64 rows: the native op splits them into chunks, one per worker thread
    # (each sums its own share of the bias and layer norm gradients).
    rows = 64
    x = rng.normal(size=(rows, T, D)).astype("float32")
    fused, generic = _twins(
        rng, peephole=True, cell_clip=CLIP, proj_units=PROJ, layer_norm=True, return_sequences=True
    )
    h0, c0 = np.zeros((rows, PROJ), "float32"), np.zeros((rows, H), "float32")
    got = _outputs_and_grads(fused, x, h0, c0, None, False)
    want = _outputs_and_grads(generic, x, h0, c0, None, False)
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize("layer_norm", [False, True], ids=["", "layer_norm"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_batch_of_two_rows_matches(rng, fused_calls, training, layer_norm):
    # Two rows: the kernel projects every step's input first, then runs
    # vector-matrix products (its small-batch path).
    rows = 2
    x = rng.normal(scale=1.5, size=(rows, T, D)).astype("float32")
    h0 = rng.normal(size=(rows, PROJ)).astype("float32")
    c0 = rng.normal(size=(rows, H)).astype("float32")
    options = {"peephole": True, "cell_clip": CLIP, "proj_units": PROJ, "zoneout_c": 0.2}
    options["layer_norm"] = layer_norm
    fused, generic = _twins(rng, return_sequences=True, recurrent_dropout=0.3, seed=2, **options)
    if training:  # the same zoneout masks for both
        masks = (rng.uniform(size=(T, rows, H)) < 0.2).astype("float32")
        fused._zoneout_masks = lambda state, steps_and_batch: masks if state == "c" else None
        generic.unroll = True
        generic.cell._zoneout = _FixedZoneout(None, masks)
    got = _outputs_and_grads(fused, x, h0, c0, MASK[:rows], training)
    assert fused_calls and fused_calls[-1] is not None
    want = _outputs_and_grads(generic, x, h0, c0, MASK[:rows], training)
    _assert_same(got, want, _gradient_names(fused))


def test_a_model_with_options_trains_fused_under_fit(rng, fused_calls):
    model = keras.Sequential(
        [
            keras.Input((T, D)),
            GatedLSTM(H, peephole=True, cifg=True, cell_clip=3.0),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=True)
    # 60 rows in batches of 16: the last batch is short, so the step is traced
    # with a free batch size.
    x = rng.normal(size=(60, T, D)).astype("float32")
    y = x[:, :, :1].sum(axis=1) / T
    history = model.fit(x, y, epochs=30, batch_size=16, verbose=0).history["loss"]
    assert fused_calls and all(options is not None for options in fused_calls)
    assert history[-1] < 0.5 * history[0]
    peepholes = [w for w in model.weights if "peephole" in w.path]
    assert peepholes and all(np.abs(np.asarray(w)).max() > 0 for w in peepholes)


@pytest.mark.parametrize(
    "options",
    [
        {"layer_norm": True, "activation": "relu"},
        {"peephole": True, "zoneout_c": 0.1, "recurrent_activation": "hard_sigmoid"},
    ],
    ids=["layer_norm_relu", "options_with_hard_sigmoid"],
)
def test_options_with_other_activations_run_keras_step_loop(rng, fused_calls, options):
    GatedLSTM(H, **options)(rng.normal(size=(B, T, D)).astype("float32"))
    assert not fused_calls


def test_options_run_keras_step_loop_where_the_native_kernel_does_not(
    rng, fused_calls, monkeypatch
):
    # Other dtypes, GPU, or no native library: the TF-ops loop has no options.
    monkeypatch.setattr(_routes, "native_reason", lambda jit_compile=False: "off in this test")
    GatedLSTM(H, peephole=True)(rng.normal(size=(B, T, D)).astype("float32"))
    assert not fused_calls
    with pytest.raises(ValueError, match="run fused only in the native kernel"):
        sequence = kernels.Sequence(
            tf.zeros((B, T, D)),
            tf.zeros((D, 4 * H)),
            tf.zeros((H, 4 * H)),
            None,
            tf.zeros((B, H)),
            tf.zeros((B, H)),
            options=kernels.CellOptions(cifg=False, cell_clip=1.0),
        )
        kernels.lstm_recurrence("loop", sequence)


ZONEOUT_OPTIONS = [
    {"zoneout_h": 0.3},
    {"zoneout_c": 0.3},
    {"zoneout_h": 0.3, "zoneout_c": 0.2, "peephole": True, "proj_units": PROJ, "cell_clip": CLIP},
    {"zoneout_h": 0.3, "zoneout_c": 0.2, "layer_norm": True, "proj_units": PROJ},
]
ZONEOUT_IDS = [
    "zoneout_h",
    "zoneout_c",
    "both_with_peephole_projection_clip",
    "both_with_layer_norm_projection",
]


class _FixedZoneout:
    """The cell's zoneout with given masks, one a call, in the order the steps run."""

    def __init__(self, masks_h, masks_c):
        self.masks = (masks_h, masks_c)
        self.step = 0

    def __call__(self, h, c, h_prev, c_prev, training, seed_generator):
        assert training
        mixed = []
        for new, prev, masks in zip((h, c), (h_prev, c_prev), self.masks, strict=True):
            if masks is not None:
                d = masks[self.step]
                new = d * prev + (1.0 - d) * new
            mixed.append(new)
        self.step += 1
        return tuple(mixed)


def _zoneout_twins(rng, cell_options, **layer_options):
    """The fused layer drawing fixed masks, and the cell's own (unrolled) loop using them."""
    fused, generic = _twins(rng, **cell_options, **layer_options)
    generic.unroll = True  # one cell call a step, in order: the masks are taken in turn
    hidden = cell_options.get("proj_units", H)
    masks = {
        rate_name: (rng.uniform(size=(T, B, width)) < cell_options[rate_name]).astype("float32")
        if rate_name in cell_options
        else None
        for rate_name, width in (("zoneout_h", hidden), ("zoneout_c", H))
    }
    fused._zoneout_masks = lambda state, steps_and_batch: masks[f"zoneout_{state}"]
    generic.cell._zoneout = _FixedZoneout(masks["zoneout_h"], masks["zoneout_c"])
    return fused, generic


@pytest.mark.parametrize("go_backwards", [False, True], ids=["forwards", "backwards"])
@pytest.mark.parametrize("cell_options", ZONEOUT_OPTIONS, ids=ZONEOUT_IDS)
def test_zoneout_in_training_matches_the_cells_own_loop_with_the_same_masks(
    rng, fused_calls, cell_options, go_backwards
):
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    fused, generic = _zoneout_twins(
        rng, cell_options, return_sequences=True, return_state=True, go_backwards=go_backwards
    )
    got = _outputs_and_grads(fused, x, h0, c0, MASK, training=True)
    assert fused_calls and fused_calls[-1].zoneout_h_rate == cell_options.get("zoneout_h", 0.0)
    want = _outputs_and_grads(generic, x, h0, c0, MASK, training=True)
    assert generic.cell._zoneout.step == T
    _assert_same(got, want, _gradient_names(fused))


@pytest.mark.parametrize("cell_options", ZONEOUT_OPTIONS, ids=ZONEOUT_IDS)
def test_zoneout_in_training_under_xla_matches_the_cells_own_loop(rng, fused_calls, cell_options):
    fused, generic = _zoneout_twins(rng, cell_options, return_sequences=True, return_state=True)
    _assert_agree_under_xla(rng, fused, generic, cell_options)
    assert fused_calls and fused_calls[-1] is not None


@pytest.mark.parametrize("cell_options", ZONEOUT_OPTIONS, ids=ZONEOUT_IDS)
def test_zoneout_in_inference_mixes_by_the_rate_like_the_cell(rng, fused_calls, cell_options):
    x, h0, c0 = _data(rng, cell_options.get("proj_units", H))
    fused, generic = _twins(rng, return_sequences=True, return_state=True, **cell_options)
    got = _outputs_and_grads(fused, x, h0, c0, MASK, training=False)
    assert fused_calls and fused_calls[-1].zoneout_h is None
    want = _outputs_and_grads(generic, x, h0, c0, MASK, training=False)
    _assert_same(got, want, _gradient_names(fused))


def test_zoneout_masks_are_drawn_like_the_cells(rng):
    # Bernoulli(rate), fresh for each step, row and unit, and seeded.
    layer = GatedLSTM(H, zoneout_h=0.25, seed=4)
    layer.build((B, T, D))
    masks = np.asarray(layer._zoneout_masks("h", (400, B)))
    assert masks.shape == (400, B, H)
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert abs(masks.mean() - 0.25) < 0.01
    assert not np.array_equal(masks[0], masks[1])
    assert layer._zoneout_masks("c", (400, B)) is None  # zoneout_c is 0
    again = GatedLSTM(H, zoneout_h=0.25, seed=4)
    again.build((B, T, D))
    np.testing.assert_array_equal(np.asarray(again._zoneout_masks("h", (400, B))), masks)

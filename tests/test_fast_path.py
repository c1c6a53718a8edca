"""The fused whole-sequence op inside GatedLSTM matches Keras and the cell's own loop.

Each parity test runs both implementations of the fused op (the native CPU
kernel and the `tf.while_loop` path that XLA compiles) and compares outputs,
final states and gradients with `keras.layers.LSTM` (an independent
implementation) or with GatedLSTM's generic step loop around the cell.
"""

import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lstm import GatedLSTM, _routes, kernels
from keras_lstm._routes import Route
from keras_lstm.kernels import _build, _native
from keras_lstm.options import OPTIONS

NATIVE_OPTIONS = [option.name for option in OPTIONS if option.native_inputs]
B, T, D, H = 3, 6, 4, 5
TOL = 1e-5

# Row 0 has a gap in the middle, row 1 starts masked (its output must stay
# zero, not h0), row 2 ends masked.
MASK = np.array(
    [
        [1, 1, 0, 0, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
    ],
    dtype=bool,
)


@pytest.fixture(params=["native", "while_loop"])
def implementation(request, monkeypatch):
    if request.param == "native":
        if not kernels.native_available():
            pytest.skip("the native kernel cannot be built here (no g++ or no TF headers)")
    else:
        monkeypatch.setattr(_routes, "native_reason", lambda jit_compile=False: "off in this test")
    return request.param


def _data(rng):
    x = rng.normal(size=(B, T, D)).astype("float32")
    h0 = rng.normal(size=(B, H)).astype("float32")
    c0 = rng.normal(size=(B, H)).astype("float32")
    return x, h0, c0


def _pair(reference_cls=keras.layers.LSTM, **kwargs):
    ours = GatedLSTM(H, **kwargs)
    reference = reference_cls(H, **kwargs)
    ours.build((B, T, D))
    reference.build((B, T, D))
    # Non-trivial weights: a random bias too, so every gate's gradient shows.
    weights = [w + 0.1 for w in ours.get_weights()]
    ours.set_weights(weights)
    reference.set_weights(weights)
    return ours, reference


def _run(layer, x, mask=None, initial_state=None, training=False):
    x = tf.constant(x)
    state = None if initial_state is None else [tf.constant(s) for s in initial_state]
    with tf.GradientTape() as tape:
        tape.watch(x)
        if state is not None:
            tape.watch(state)
        out = layer(x, mask=mask, initial_state=state, training=training)
        outs = out if isinstance(out, (list, tuple)) else [out]
        # Weight each output differently so that no gradient is trivially symmetric.
        loss = sum(tf.reduce_sum(_ramp(o) * o * o) for o in outs)
    sources = [x, *layer.trainable_weights] + ([] if state is None else state)
    grads = tape.gradient(loss, sources)
    return [np.asarray(o) for o in outs], [np.asarray(g) for g in grads]


def _ramp(o):
    size = tf.size(o)
    return tf.reshape(tf.cast(tf.range(1, size + 1), o.dtype) / tf.cast(size, o.dtype), tf.shape(o))


def _assert_same(a, b):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    assert len(outs_a) == len(outs_b)
    for oa, ob in zip(outs_a, outs_b, strict=True):
        assert oa.shape == ob.shape
        np.testing.assert_allclose(oa, ob, atol=TOL, rtol=TOL)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(ga, gb, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "options",
    [
        {"return_sequences": True},
        {"return_sequences": False, "return_state": True},
        {"return_sequences": True, "go_backwards": True, "return_state": True},
        {"return_sequences": True, "zero_output_for_mask": True},
    ],
    ids=["sequences", "last", "backwards", "zero_output_for_mask"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "mask_with_gaps"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_fused_op_matches_keras_lstm(implementation, rng, options, masked, with_state, training):
    # In inference the native op keeps nothing for the backward pass, and a
    # gradient runs the forward pass again: both must give Keras's gradients.
    x, h0, c0 = _data(rng)
    ours, reference = _pair(**options)
    mask = tf.constant(MASK) if masked else None
    state = [h0, c0] if with_state else None
    _assert_same(
        _run(ours, x, mask, state, training=training),
        _run(reference, x, mask, state, training=training),
    )


@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "sequences"])
def test_native_op_keeps_per_step_buffers_only_for_training(rng, return_sequences):
    if not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no g++ or no TF headers)")
    x = tf.constant(_data(rng)[0])
    layer = GatedLSTM(H, return_sequences=return_sequences)
    layer(x)

    def kept(training):
        graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(x).graph
        (op,) = [op for op in graph.get_operations() if op.type == "KerasLstmSequence"]
        return [output.shape.as_list() for output in op.outputs[:3]]

    # h, c and the gates of every step: the backward pass reads all three.
    assert kept(True) == [[T, B, H], [T, B, H], [T, B, 4 * H]]
    # Inference keeps the sequence of h only when it is the output.
    assert kept(False) == [[T, B, H] if return_sequences else [0], [0], [0]]


def test_fused_op_matches_keras_lstm_on_a_batch_split_across_threads(implementation, rng):
    # Ten rows: the native kernel cuts the batch in chunks and uses full matrix products.
    x = rng.normal(size=(10, T, D)).astype("float32")
    mask = tf.constant(np.tile(MASK, (4, 1))[:10])
    ours = GatedLSTM(H, return_sequences=True, return_state=True)
    reference = keras.layers.LSTM(H, return_sequences=True, return_state=True)
    ours.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(ours.get_weights())
    _assert_same(_run(ours, x, mask), _run(reference, x, mask))


def test_fused_op_matches_the_cells_own_loop(implementation, rng):
    x, h0, c0 = _data(rng)
    fused, generic = _pair(reference_cls=GatedLSTM, return_sequences=True, go_backwards=True)
    generic._pinned_route = Route.STEP_LOOP
    mask = tf.constant(MASK)
    _assert_same(_run(fused, x, mask, [h0, c0]), _run(generic, x, mask, [h0, c0]))


@pytest.mark.parametrize("uses_final_c", [False, True], ids=["output_only", "with_final_c"])
def test_traced_native_gradient_of_the_final_state_keeps_no_per_step_buffers(rng, uses_final_c):
    if not kernels.native_available():
        pytest.skip("the native kernel cannot be built here (no g++ or no TF headers)")
    x = tf.constant(_data(rng)[0])
    ours, reference = _pair(return_state=True)

    def gradients_of(layer):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out, _, c = layer(x)
                loss = tf.reduce_sum(_ramp(out) * out * out)
                if uses_final_c:
                    loss += tf.reduce_sum(_ramp(c) * c * c)
            return tape.gradient(loss, [x, *layer.trainable_weights])

        return step

    step = gradients_of(ours)
    for ga, gb in zip(step(x), gradients_of(reference)(x), strict=True):
        np.testing.assert_allclose(ga, gb, atol=TOL, rtol=TOL)
    graph = step.get_concrete_function(x).graph
    (grad_op,) = [op for op in graph.get_operations() if op.type == "KerasLstmSequenceGrad"]
    # A loss on the final state alone sends (B, H) gradients to the op's final-state
    # outputs; the (T, B, H) gradients of every step's h and c stay empty, not zeros.
    dh_seq, dc_seq, dh_last, dc_last = grad_op.inputs[6:10]
    assert dh_seq.shape.as_list() == dc_seq.shape.as_list() == [0]
    assert dh_last.shape.as_list() == [B, H]
    assert dc_last.shape.as_list() == ([B, H] if uses_final_c else [0])
    # dU is taken from slices of h, not from a concatenated copy of every h.
    assert not [op for op in graph.get_operations() if op.type == "ConcatV2"]


def test_fused_op_is_the_path_taken_for_a_standard_cell(monkeypatch, rng):
    calls = []
    real = kernels.lstm_recurrence
    monkeypatch.setattr(
        kernels, "lstm_recurrence", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    GatedLSTM(H)(rng.normal(size=(B, T, D)).astype("float32"))
    assert calls, "a standard GatedLSTM must run the fused op"


@pytest.mark.parametrize(
    "options, training, fused",
    [
        ({"recurrent_dropout": 0.3}, True, True),
        ({"recurrent_dropout": 0.3}, False, True),
        ({"dropout": 0.3}, True, True),
        ({"activation": "relu"}, False, False),
        ({"recurrent_activation": "hard_sigmoid"}, False, False),
        ({"unroll": True}, False, False),
        ({"layer_norm": True, "activation": "relu"}, False, False),
        ({"peephole": True, "cifg": True, "cell_clip": 3.0}, False, True),
        ({"layer_norm": True}, True, True),
    ],
    ids=[
        "recurrent_dropout_training_fused",
        "recurrent_dropout_inference_fused",
        "dropout_training_fused",
        "other_activation_falls_back",
        "other_recurrent_activation_falls_back",
        "unroll_runs_one_op_per_step",
        "options_with_another_activation_fall_back",
        "options_the_native_kernel_computes_fused",
        "layer_norm_fused",
    ],
)
def test_fallback_rule(monkeypatch, rng, options, training, fused):
    if fused and set(options) & set(NATIVE_OPTIONS) and not kernels.native_available():
        fused = False  # only the native kernel computes the options
    calls = []
    real = kernels.lstm_recurrence
    monkeypatch.setattr(
        kernels, "lstm_recurrence", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    layer = GatedLSTM(H, **options)
    layer(rng.normal(size=(B, T, D)).astype("float32"), training=training)
    assert bool(calls) == fused


def test_input_dropout_uses_the_same_mask_as_the_cell(implementation, rng):
    x, _, _ = _data(rng)
    fused, generic = _pair(reference_cls=GatedLSTM, dropout=0.4, seed=7, return_sequences=True)
    generic._pinned_route = Route.STEP_LOOP
    out_fused = _run(fused, x, training=True)
    out_generic = _run(generic, x, training=True)
    # Dropout really acted: the training output differs from inference.
    assert not np.allclose(out_fused[0][0], np.asarray(fused(x, training=False)), atol=1e-3)
    _assert_same(out_fused, out_generic)


@pytest.mark.parametrize(
    "options",
    [
        {"return_sequences": True},
        {"return_sequences": True, "go_backwards": True, "return_state": True},
        {"return_sequences": False, "dropout": 0.2},
    ],
    ids=["sequences", "backwards_with_states", "last_with_input_dropout"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_recurrent_dropout_matches_the_cells_own_loop(implementation, rng, options, masked):
    # Keras's meaning: one mask per sequence on h_{t-1} before the recurrent
    # product, the mask the cell's `call` would draw; outputs and gradients.
    x, h0, c0 = _data(rng)
    kwargs = {"recurrent_dropout": 0.4, "seed": 11, **options}
    fused, generic = _pair(reference_cls=GatedLSTM, **kwargs)
    generic._pinned_route = Route.STEP_LOOP
    mask = MASK if masked else None
    out_fused = _run(fused, x, mask=mask, initial_state=[h0, c0], training=True)
    out_generic = _run(generic, x, mask=mask, initial_state=[h0, c0], training=True)
    # Recurrent dropout really acted: training differs from inference.
    plain = np.asarray(fused(x, mask=mask, initial_state=[h0, c0], training=False)[0])
    assert not np.allclose(out_fused[0][0], plain, atol=1e-3)
    _assert_same(out_fused, out_generic)


def test_recurrent_dropout_with_a_free_batch_size_matches_the_cells_own_loop(implementation, rng):
    # `model.fit` traces with the batch size unknown (a last, partial batch):
    # the recurrent kernel's gradient must still see the mask.
    x, _, _ = _data(rng)
    fused, generic = _pair(
        reference_cls=GatedLSTM, recurrent_dropout=0.4, seed=5, return_sequences=True
    )
    generic._pinned_route = Route.STEP_LOOP
    results = []
    for layer in (fused, generic):

        @tf.function(input_signature=[tf.TensorSpec((None, T, D), tf.float32)])
        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                loss = tf.reduce_sum(_ramp(y) * y * y)
            return [y, *tape.gradient(loss, layer.trainable_weights)]

        results.append([np.asarray(v) for v in step(tf.constant(x))])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def test_recurrent_dropout_under_xla_matches_the_cells_own_loop(implementation, rng):
    x, h0, c0 = _data(rng)
    fused, generic = _pair(
        reference_cls=GatedLSTM, recurrent_dropout=0.3, seed=5, return_sequences=True
    )
    generic._pinned_route = Route.STEP_LOOP

    @tf.function(jit_compile=True)
    def step(layer, x, h0, c0):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            y = layer(x, initial_state=[h0, c0], training=True)
            loss = tf.reduce_sum(_ramp(y) * y * y)
        return y, tape.gradient(loss, [x, h0, c0, *layer.trainable_weights])

    args = (tf.constant(x), tf.constant(h0), tf.constant(c0))
    y_fused, g_fused = step(fused, *args)
    y_generic, g_generic = step(generic, *args)
    np.testing.assert_allclose(y_fused, y_generic, atol=TOL)
    for a, b in zip(g_fused, g_generic, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "policy, tolerance", [("mixed_float16", 2e-3), ("mixed_bfloat16", 2e-2)], ids=["f16", "bf16"]
)
def test_mixed_precision_runs_fused_and_matches_the_cells_own_loop(
    implementation, monkeypatch, rng, policy, tolerance
):
    # On CPU the native kernel runs a mixed policy in float32, cast in and out;
    # the while-loop path computes in float16/bfloat16 itself.
    calls = []
    real = _native.lstm_sequence
    monkeypatch.setattr(_native, "lstm_sequence", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, h0, c0 = _data(rng)
    fused = GatedLSTM(H, dtype=policy, return_sequences=True)
    generic = GatedLSTM(H, dtype=policy, return_sequences=True)
    fused.build(x.shape)
    generic.build(x.shape)
    generic.set_weights(fused.get_weights())
    generic._pinned_route = Route.STEP_LOOP
    out = fused(x)
    assert out.dtype == policy.removeprefix("mixed_")
    assert bool(calls) == (implementation == "native")
    np.testing.assert_allclose(
        np.asarray(out, "float32"), np.asarray(generic(x), "float32"), atol=tolerance
    )
    grads = []
    for layer in (fused, generic):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        grads.append(tape.gradient(loss, layer.trainable_weights))
    for a, b in zip(*grads, strict=True):
        assert a.dtype == tf.float32 and np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=10 * tolerance)


def test_stateful_carries_state_like_keras(implementation, rng):
    x1, _, _ = _data(rng)
    x2 = rng.normal(size=(B, T, D)).astype("float32")
    ours, reference = _pair(stateful=True, return_sequences=True)
    for x in (x1, x2):
        np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), atol=TOL)
    for s_ours, s_ref in zip(ours.states, reference.states, strict=True):
        np.testing.assert_allclose(np.asarray(s_ours), np.asarray(s_ref), atol=TOL)


@pytest.mark.parametrize("go_backwards", [False, True], ids=["forwards", "backwards"])
def test_jit_compiled_gradients_match_keras(implementation, rng, go_backwards):
    # Under XLA the native kernel runs as a custom call (tests/test_xla_native.py).
    x, h0, c0 = _data(rng)
    ours, reference = _pair(return_sequences=True, go_backwards=go_backwards)

    @tf.function(jit_compile=True)
    def step(layer, x, mask, h0, c0):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            y = layer(x, mask=mask, initial_state=[h0, c0])
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x, h0, c0, *layer.trainable_weights])

    args = (tf.constant(x), tf.constant(MASK), tf.constant(h0), tf.constant(c0))
    y_ours, g_ours = step(ours, *args)
    y_ref, g_ref = step(reference, *args)
    np.testing.assert_allclose(y_ours, y_ref, atol=TOL)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def test_jit_compiled_training_step_runs_through_a_model(rng):
    model = keras.Sequential([keras.Input((T, D)), GatedLSTM(H), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x = rng.normal(size=(B, T, D)).astype("float32")
    before = model.get_weights()[1].copy()
    model.fit(x, np.ones((B, 1), "float32"), epochs=1, verbose=0)
    assert model.jit_compile
    assert not np.allclose(model.get_weights()[1], before)


def test_native_kernel_failure_falls_back_with_one_warning(monkeypatch, tmp_path, rng):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="native LSTM kernel unavailable"):
        assert _native.native_module() is None
    # The layer still runs, on the while-loop path, and agrees with Keras.
    x, _, _ = _data(rng)
    ours, reference = _pair(return_sequences=True)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), atol=TOL)


def test_the_package_ships_every_local_header_the_native_sources_include():
    # The kernels are compiled from the installed package on first use: a header
    # left out of the wheel turns every native path into the fallback.
    folder = Path(_native.__file__).parent
    for source in folder.glob("*.cc"):
        for name in re.findall(r'#include "([^"/]+)"', source.read_text()):
            assert (folder / name).is_file(), f"{source.name} includes {name}, not installed"


@pytest.mark.skipif(
    shutil.which("g++") is None or not _build.supported_platform(),
    reason="no C++ compiler or an unsupported platform: the TF-ops path is the implementation",
)
def test_native_kernel_builds_where_a_compiler_is_present(monkeypatch):
    monkeypatch.delenv("KERAS_LSTM_NATIVE", raising=False)
    assert kernels.native_available()


def test_native_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("KERAS_LSTM_NATIVE", "0")
    assert _native.native_module() is None


def test_pad_to_bucket_pads_to_a_multiple_and_masks_the_padding():
    from keras_lstm import pad_to_bucket

    a, b = np.arange(10.0).reshape(5, 2), np.ones((9, 2))
    batch, mask = pad_to_bucket([a, b], bucket=8, value=-1.0)
    assert batch.shape == (2, 16, 2) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0, :5], a)
    assert (batch[0, 5:] == -1).all()
    np.testing.assert_array_equal(mask.sum(axis=1), [5, 9])


def test_padded_batch_gives_the_unpadded_result_and_one_compile_per_bucket(rng):
    from keras_lstm import pad_to_bucket

    layer = GatedLSTM(H)
    layer.build((B, None, D))
    traces = []

    @tf.function(jit_compile=True)
    def run(x, mask):
        traces.append(x.shape)
        return layer(x, mask=mask)

    for length in (5, 7, 8):  # all in the bucket of 8
        seqs = [rng.normal(size=(length, D)).astype("float32") for _ in range(B)]
        batch, mask = pad_to_bucket(seqs, bucket=8)
        np.testing.assert_allclose(
            np.asarray(run(batch, mask)), np.asarray(layer(np.stack(seqs))), atol=TOL
        )
    assert len(traces) == 1


@pytest.mark.parametrize(
    "sequences, bucket, error, match",
    [
        ([np.ones((3, 2))], 0, ValueError, "`bucket` must be a positive integer"),
        ([np.ones((3, 2))], 2.5, ValueError, "`bucket` must be a positive integer"),
        (np.ones((2, 3, 2)), 4, TypeError, "`sequences` must be a list"),
        ([], 4, ValueError, "`sequences` must not be empty"),
        ([np.ones(3)], 4, ValueError, r"`sequences\[0\]` must have shape \(length, features\)"),
        ([np.ones((3, 2)), np.ones((3, 4))], 4, ValueError, r"`sequences\[1\]` has 4 features"),
    ],
)
def test_pad_to_bucket_rejects_bad_input(sequences, bucket, error, match):
    from keras_lstm import pad_to_bucket

    with pytest.raises(error, match=match):
        pad_to_bucket(sequences, bucket=bucket)


def test_benchmark_quick_run_writes_json_and_chart(tmp_path):
    import json

    from benchmarks import run

    run.main(
        [
            "--quick",
            "--modes",
            "eager",
            "--rounds",
            "1",
            "--no-torch",
            "--target-seconds",
            "0.01",
            "--options",
            "peephole,proj_units",
            "--dtype",
            "float32,mixed_bfloat16",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "benchmark.json").read_text())
    (only,) = result["runs"]
    ours = only["contenders"]["GatedLSTM"]
    extra = [
        "GatedLSTM(peephole)",
        "GatedLSTM(proj_units)",
        "GatedLSTM [mixed_bfloat16]",
        "keras.layers.LSTM [mixed_bfloat16]",
    ]
    assert set(only["contenders"]) == {
        "GatedLSTM",
        "keras.layers.LSTM",
        "keras.layers.RNN(LSTMCell)",
        *extra,
    }
    assert only["extra_rows"] == extra
    assert ours["train_seq_per_s"] > 0 and ours["infer_seq_per_s"] > 0
    assert ours["train_ratio_to keras.layers.LSTM"] > 0
    assert 0 < ours["train_pct_of_matmul_limit"]
    for name in extra:
        assert only["contenders"][name]["train_cost_vs_plain"] > 0
    assert (tmp_path / "benchmark.png").stat().st_size > 1000


def test_profile_takes_a_training_step_and_an_inference_call_apart(capsys):
    from benchmarks import profile

    assert profile.main(["--sizes", "4x3x2x5"]) == 0
    assert profile.main(["--sizes", "4x3x2x5", "--inference"]) == 0
    out = capsys.readouterr().out
    for part in ("native backward recurrence", "XLA forward recurrence", "native op alone"):
        assert part in out
    if kernels.native_available():
        assert "native forward, projection included (training)" in out


def test_benchmark_rejects_unknown_options_and_dtypes():
    from benchmarks import run

    with pytest.raises(SystemExit, match="--options: expected names from .* got 'peeophole'"):
        run.main(["--quick", "--options", "peeophole"])
    with pytest.raises(SystemExit, match="--dtype: expected names from .* got 'bf16'"):
        run.main(["--quick", "--dtype", "bf16"])


def test_benchmark_rejects_malformed_sizes():
    from benchmarks import run

    with pytest.raises(SystemExit, match="--sizes: expected items like 64x100x32x128"):
        run.main(["--sizes", "64x100x32", "--out", "unused"])


def test_exports_hold_tensorflow_ops_only(tmp_path, rng):
    """A SavedModel must load where our native kernel's library is not loaded."""
    model = keras.Sequential([keras.Input((T, D)), GatedLSTM(H), keras.layers.Dense(1)])
    x = rng.normal(size=(B, T, D)).astype("float32")
    model(x)
    model.export(tmp_path / "exported", verbose=False)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    for folder in ("exported", "saved"):
        graph = (tmp_path / folder / "saved_model.pb").read_bytes()
        assert b"KerasLstmSequence" not in graph, folder

    def op_types():
        traced = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec((B, T, D)))
        return {op.type for op in traced.graph.get_operations()}

    assert kernels.native_available()
    assert "KerasLstmSequence" in op_types()  # an ordinary trace does use the native op
    with _routes.exporting():
        assert "KerasLstmSequence" not in op_types()
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(loaded.serve(x), model(x), atol=1e-5)

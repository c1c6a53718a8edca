"""The cell's options, each checked against a NumPy re-derivation (tests/lstm_reference.py)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from lstm_reference import run, step, weights_by_name

import keras_lstm
from keras_lstm import GatedLSTM, GatedLSTMCell

ALL_OPTIONS = dict(
    peephole=True,
    layer_norm=True,
    cifg=True,
    proj_units=3,
    zoneout_h=0.2,
    zoneout_c=0.3,
    chrono_init=12,
    cell_clip=0.8,
)

CASES = {
    "peephole": dict(peephole=True),
    "layer_norm": dict(layer_norm=True),
    "layer_norm_without_bias": dict(layer_norm=True, use_bias=False),
    "cifg": dict(cifg=True),
    "proj_units": dict(proj_units=2),
    "zoneout_h": dict(zoneout_h=0.3),
    "zoneout_c": dict(zoneout_c=0.4),
    "chrono_init": dict(chrono_init=20),
    "cell_clip": dict(cell_clip=0.3),
    "peephole_cifg_proj": dict(peephole=True, cifg=True, proj_units=3),
    "all": ALL_OPTIONS,
}


def _randomize(layer, rng, scale=0.6):
    """Random weights everywhere, gains around one, so no option hides behind a zero."""
    new = []
    for w in layer.weights:
        value = rng.normal(0.0, scale, w.shape)
        if "gamma" in w.name:
            value = 1.0 + 0.3 * value
        new.append(value.astype("float32"))
    layer.set_weights(new)


def _x(rng, batch=3, time=5, features=4):
    return rng.normal(size=(batch, time, features)).astype("float32")


@pytest.mark.parametrize("name", list(CASES))
def test_option_matches_numpy_rederivation(name, rng):
    opts = CASES[name]
    x = _x(rng)
    layer = GatedLSTM(5, return_sequences=True, **opts)
    layer(x)
    _randomize(layer, rng)
    expected = run(x, weights_by_name(layer), opts)["hidden"]
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_all_options_with_masking_match_numpy(rng):
    x = _x(rng, batch=3, time=6)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 0]], bool)
    layer = GatedLSTM(5, return_sequences=True, return_state=True, **ALL_OPTIONS)
    layer(x)
    _randomize(layer, rng)
    ref = run(x, weights_by_name(layer), ALL_OPTIONS, mask=mask)
    seq, h, c = layer(x, mask=mask)
    np.testing.assert_allclose(h, ref["hidden"][:, -1], atol=1e-5)
    np.testing.assert_allclose(c, ref["cell"][:, -1], atol=1e-5)
    # Keras repeats the last kept output at masked steps.
    np.testing.assert_allclose(seq, ref["hidden"], atol=1e-5)


def test_all_options_bidirectional_match_numpy(rng):
    x = _x(rng)
    layer = keras.layers.Bidirectional(GatedLSTM(5, return_sequences=True, **ALL_OPTIONS))
    layer(x)
    _randomize(layer, rng)
    forward = run(x, weights_by_name(layer.forward_layer), ALL_OPTIONS)["hidden"]
    backward = run(x, weights_by_name(layer.backward_layer), ALL_OPTIONS, go_backwards=True)
    expected = np.concatenate([forward, backward["hidden"]], axis=-1)
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_all_options_stacked_match_numpy(rng):
    x = _x(rng)
    first = GatedLSTM(5, return_sequences=True, **ALL_OPTIONS)
    second = GatedLSTM(4, **{**ALL_OPTIONS, "proj_units": 2})
    model = keras.Sequential([keras.Input((5, 4)), first, second])
    _randomize(first, rng)
    _randomize(second, rng)
    middle = run(x, weights_by_name(first), ALL_OPTIONS)["hidden"]
    last = run(middle, weights_by_name(second), {**ALL_OPTIONS, "proj_units": 2})["hidden"]
    np.testing.assert_allclose(model(x), last[:, -1], atol=1e-5)


def test_all_options_under_jit_compile_match_eager_and_train(rng):
    x = _x(rng)
    y = rng.normal(size=(3, 1)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5, 4)), GatedLSTM(5, dropout=0.1, **ALL_OPTIONS), keras.layers.Dense(1)]
    )
    eager = np.asarray(model(x))
    compiled = tf.function(lambda v: model(v), jit_compile=True)
    np.testing.assert_allclose(compiled(x), eager, atol=1e-5)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, epochs=2, batch_size=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_zoneout_in_training_keeps_each_unit_old_or_new(rng):
    cell = GatedLSTMCell(8, zoneout_h=0.3, zoneout_c=0.6, peephole=True)
    batch = 64
    x = rng.normal(size=(batch, 4)).astype("float32")
    h0 = rng.normal(size=(batch, 8)).astype("float32")
    c0 = rng.normal(size=(batch, 8)).astype("float32")
    cell(x, [h0, c0])
    _randomize(cell, rng)
    _, (h, c) = cell(x, [h0, c0], training=True)
    opts = {"peephole": True}
    _, _, _, h_new, c_new = step(x, h0, c0, weights_by_name(cell), opts)
    h, c = np.asarray(h), np.asarray(c)
    for got, old, new, rate in [(h, h0, h_new, 0.3), (c, c0, c_new, 0.6)]:
        kept = np.isclose(got, old, atol=1e-5)
        updated = np.isclose(got, new, atol=1e-5)
        assert np.all(kept | updated)
        assert abs(kept.mean() - rate) < 0.08, kept.mean()


def test_chrono_init_draws_forget_bias_from_log_uniform_and_input_bias_opposite():
    t_max = 50
    cell = GatedLSTMCell(400, chrono_init=t_max, seed=3)
    cell.build((None, 2))
    b_i, b_f, b_c, b_o = np.split(np.asarray(cell.bias), 4)
    assert np.all(b_f >= 0) and np.all(b_f <= np.log(t_max - 1) + 1e-6)
    # log(U) of a uniform: its exponential is uniform on [1, T_max - 1].
    assert abs(np.exp(b_f).mean() - (1 + t_max - 1) / 2) < 3
    np.testing.assert_array_equal(b_i, -b_f)
    np.testing.assert_array_equal(b_c, 0)
    np.testing.assert_array_equal(b_o, 0)
    assert cell.is_standard_lstm  # only the start changes, not the maths


def test_chrono_init_with_cifg_sets_the_forget_slice_only():
    cell = GatedLSTMCell(6, chrono_init=10, cifg=True)
    cell.build((None, 2))
    b_f, b_c, b_o = np.split(np.asarray(cell.bias), 3)
    assert np.all((b_f >= 0) & (b_f <= np.log(9) + 1e-6)) and b_f.std() > 0
    np.testing.assert_array_equal(np.concatenate([b_c, b_o]), 0)


def test_option_weight_shapes_and_state_sizes():
    layer = GatedLSTM(6, return_state=True, cifg=True, proj_units=2, peephole=True)
    out, h, c = layer(np.zeros((2, 3, 4), "float32"))
    shapes = {w.name: tuple(w.shape) for w in layer.weights}
    assert shapes == {
        "kernel": (4, 18),
        "recurrent_kernel": (2, 18),
        "bias": (18,),
        "forget_peephole": (6,),
        "output_peephole": (6,),
        "projection_kernel": (6, 2),
    }
    assert (out.shape, h.shape, c.shape) == ((2, 2), (2, 2), (2, 6))
    assert layer.cell.state_size == [2, 6]


def test_layer_norm_without_bias_has_no_shift_weights():
    layer = GatedLSTM(3, layer_norm=True, use_bias=False)
    layer.build((None, 2, 2))
    names = [w.name for w in layer.weights]
    assert "bias" not in names and "cell_norm_beta" not in names
    assert "cell_norm_gamma" in names


def test_every_option_off_keeps_keras_lstm_weights_and_outputs(rng):
    x = _x(rng)
    ref = keras.layers.LSTM(5, return_sequences=True)
    ref(x)
    layer = GatedLSTM(5, return_sequences=True)
    layer(x)
    assert [tuple(w.shape) for w in layer.weights] == [tuple(w.shape) for w in ref.weights]
    layer.set_weights(ref.get_weights())
    np.testing.assert_allclose(layer(x), ref(x), atol=1e-6)
    assert layer.cell.is_standard_lstm


def test_options_that_change_the_maths_are_not_standard():
    for option in [k for k in CASES if k not in ("chrono_init", "layer_norm_without_bias")]:
        assert not GatedLSTMCell(4, **CASES[option]).is_standard_lstm, option


def test_all_options_round_trip_through_get_config():
    layer = GatedLSTM(5, return_sequences=True, **ALL_OPTIONS)
    config = layer.get_config()
    for name, value in ALL_OPTIONS.items():
        assert config[name] == value
        assert getattr(layer, name) == value
    again = GatedLSTM.from_config(json.loads(json.dumps(config)))
    assert again.get_config() == config
    cell = GatedLSTMCell(5, **ALL_OPTIONS)
    assert GatedLSTMCell.from_config(cell.get_config()).get_config() == cell.get_config()


BAD_OPTIONS = [
    (dict(zoneout_h=-0.1), ValueError, r"`zoneout_h` must be a float in \[0, 1\)"),
    (dict(zoneout_c=1.0), ValueError, r"`zoneout_c` must be a float in \[0, 1\)"),
    (dict(proj_units=5), ValueError, r"`proj_units` must be smaller than `units` \(5\)"),
    (dict(proj_units=0), ValueError, r"`proj_units` must be a positive integer"),
    (dict(chrono_init=1), ValueError, r"`chrono_init` must be a number >= 2"),
    (dict(chrono_init=1.5), ValueError, r"`chrono_init` must be a number >= 2"),
    (dict(chrono_init="10"), ValueError, r"`chrono_init` must be a number >= 2"),
    (
        dict(chrono_init=10, use_bias=False),
        ValueError,
        r"`chrono_init` .* needs `use_bias=True`",
    ),
    (dict(cell_clip=0), ValueError, r"`cell_clip` must be a positive number"),
    (dict(cell_clip=-1.0), ValueError, r"`cell_clip` must be a positive number"),
    (dict(peephole="yes"), TypeError, r"`peephole` must be True or False"),
    (dict(layer_norm=1), TypeError, r"`layer_norm` must be True or False"),
    (dict(cifg=None), TypeError, r"`cifg` must be True or False"),
]


def test_bad_options_raise_clear_errors():
    for kwargs, error, message in BAD_OPTIONS:
        with pytest.raises(error, match=message):
            GatedLSTMCell(5, **kwargs)
        with pytest.raises(error, match=message):
            GatedLSTM(5, **kwargs)


def test_initial_state_with_projection_expects_projected_h():
    layer = GatedLSTM(5, proj_units=2)
    x = np.zeros((2, 3, 4), "float32")
    layer(x, initial_state=[np.zeros((2, 2), "float32"), np.zeros((2, 5), "float32")])
    with pytest.raises(ValueError, match=r"`initial_state` h must have shape \(2, 2\)"):
        layer(x, initial_state=[np.zeros((2, 5), "float32"), np.zeros((2, 5), "float32")])


def test_all_options_survive_keras_save_and_load_in_a_fresh_process(tmp_path, rng):
    x = _x(rng)
    mask_input = keras.Input((5, 4))
    masked = keras.layers.Masking()(mask_input)
    hidden = keras.layers.Bidirectional(GatedLSTM(5, return_sequences=True, **ALL_OPTIONS))(masked)
    out = GatedLSTM(4, **{**ALL_OPTIONS, "proj_units": 2})(hidden)
    model = keras.Model(mask_input, out)
    for layer in model.layers:
        if layer.weights:
            _randomize(layer, rng)
    x[0, 3:] = 0.0  # masked tail
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", np.asarray(model(x)))
    model.save(tmp_path / "model.keras")
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, keras_lstm
        model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        got = np.asarray(model(x))
        expected = np.load({str(tmp_path / "expected.npy")!r})
        layer = model.layers[-1]
        assert isinstance(layer, keras_lstm.GatedLSTM) and layer.proj_units == 2, layer
        assert layer.cifg and layer.peephole and layer.layer_norm and layer.cell_clip == 0.8
        print("max_abs_diff", float(np.max(np.abs(got - expected))))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.path.dirname(os.path.dirname(keras_lstm.__file__)),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    diff = float(done.stdout.split("max_abs_diff")[-1])
    assert diff < 1e-6


def test_zoneout_training_on_jax_is_refused_and_inference_runs():
    """JAX's scan cannot advance a seed per step, so training zoneout there says so."""
    pytest.importorskip("jax", reason="needs the `jax` extra")
    script = (
        "import numpy as np, keras_lstm\n"
        "layer = keras_lstm.GatedLSTM(4, zoneout_h=0.5, zoneout_c=0.2, return_sequences=True)\n"
        "x = np.ones((2, 5, 3), 'float32')\n"
        "print('inference', layer(x, training=False).shape)\n"
        "try:\n"
        "    layer(x, training=True)\n"
        "except NotImplementedError as error:\n"
        "    print('refused:', error)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "inference (2, 5, 4)" in result.stdout
    assert "refused: " in result.stdout
    assert "`zoneout_h` and `zoneout_c` need a new random mask" in result.stdout

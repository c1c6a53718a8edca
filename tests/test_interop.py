"""Converters between GatedLSTM, torch.nn.LSTM and keras.layers.LSTM, checked on outputs."""

import sys

import keras
import numpy as np
import pytest

import keras_lstm
from keras_lstm import GatedLSTM

torch = pytest.importorskip("torch", reason="the converters need the `torch` extra")

TOL = 1e-5


def _torch_output(lstm, x):
    """Run torch on batch-first `x`, whatever its `batch_first`; return batch-first output."""
    tx = torch.from_numpy(x if lstm.batch_first else np.ascontiguousarray(x.transpose(1, 0, 2)))
    with torch.no_grad():
        out = lstm.eval()(tx)[0].numpy()
    return out if lstm.batch_first else out.transpose(1, 0, 2)


@pytest.fixture
def x(rng):
    return rng.normal(size=(3, 6, 4)).astype("float32")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_first=True),
        dict(batch_first=False, bias=False),
        dict(batch_first=True, proj_size=2),
        dict(batch_first=False, num_layers=2, bidirectional=True, proj_size=3, dropout=0.25),
    ],
    ids=["one_layer", "time_first_no_bias", "projection", "stacked_bidirectional_projection"],
)
def test_from_torch_matches_torch_outputs(kwargs, x):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 5, **kwargs)
    with torch.no_grad():  # non-zero hh biases, so a lost bias would show
        for name, p in lstm.named_parameters():
            if name.startswith("bias_hh"):
                p.uniform_(-0.5, 0.5)
    keras_side = keras_lstm.from_torch(lstm)
    np.testing.assert_allclose(keras_side(x), _torch_output(lstm, x), atol=TOL)
    if kwargs.get("num_layers", 1) > 1:
        assert isinstance(keras_side, keras.Sequential)
        assert any(isinstance(layer, keras.layers.Dropout) for layer in keras_side.layers)


def test_from_torch_maps_gate_order_and_summed_biases(x):
    lstm = torch.nn.LSTM(4, 3, batch_first=True)
    layer = keras_lstm.from_torch(lstm)
    kernel, recurrent, bias = layer.get_weights()
    p = {name: v.detach().numpy() for name, v in lstm.named_parameters()}
    # torch gate rows i, f, g, o are Keras's kernel columns i, f, c, o.
    np.testing.assert_array_equal(kernel, p["weight_ih_l0"].T)
    np.testing.assert_array_equal(recurrent, p["weight_hh_l0"].T)
    np.testing.assert_allclose(bias, p["bias_ih_l0"] + p["bias_hh_l0"], atol=0)


def test_from_torch_last_step_only(x):
    lstm = torch.nn.LSTM(4, 5, batch_first=True)
    layer = keras_lstm.from_torch(lstm, return_sequences=False)
    np.testing.assert_allclose(layer(x), _torch_output(lstm, x)[:, -1], atol=TOL)


def test_to_torch_matches_keras_outputs(x):
    layer = GatedLSTM(5, return_sequences=True, chrono_init=8)
    layer(x)
    lstm = keras_lstm.to_torch(layer)
    np.testing.assert_allclose(_torch_output(lstm, x), layer(x), atol=TOL)


def test_to_torch_of_a_keras_lstm_stack_matches_keras_outputs(x):
    model = keras.Sequential(
        [
            keras.Input((6, 4)),
            keras.layers.Bidirectional(keras.layers.LSTM(5, return_sequences=True)),
            keras.layers.Dropout(0.1),
            keras.layers.Bidirectional(GatedLSTM(5, return_sequences=True)),
        ]
    )
    lstm = keras_lstm.to_torch(model, batch_first=False)
    assert (lstm.num_layers, lstm.bidirectional, lstm.dropout) == (2, True, 0.1)
    np.testing.assert_allclose(_torch_output(lstm, x), model(x), atol=TOL)


def test_torch_projection_model_moves_to_keras_and_back_unchanged(x):
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(4, 6, num_layers=2, proj_size=3, batch_first=True, bidirectional=True)
    keras_side = keras_lstm.from_torch(lstm)
    back = keras_lstm.to_torch(keras_side)
    expected = _torch_output(lstm, x)
    np.testing.assert_allclose(keras_side(x), expected, atol=TOL)
    np.testing.assert_allclose(_torch_output(back, x), expected, atol=TOL)
    assert back.proj_size == 3 and keras_side.layers[0].forward_layer.proj_units == 3


def test_from_keras_layer_keeps_config_weights_and_outputs(x):
    lstm = keras.layers.LSTM(5, return_sequences=True, go_backwards=True, name="enc")
    lstm(x)
    gated = keras_lstm.from_keras(lstm)
    assert isinstance(gated, GatedLSTM) and gated.go_backwards and gated.name == "enc"
    np.testing.assert_allclose(gated(x), lstm(x), atol=1e-6)


def test_from_keras_model_replaces_every_lstm(x):
    inputs = keras.Input((6, 4))
    masked = keras.layers.Masking()(inputs)
    inner = keras.Sequential([keras.Input((6, 10)), keras.layers.LSTM(3, return_sequences=True)])
    seq = keras.layers.Bidirectional(keras.layers.LSTM(5, return_sequences=True))(masked)
    seq = inner(seq)
    out = keras.layers.Dense(1)(keras.layers.LSTM(2)(seq))
    model = keras.Model(inputs, out)
    x[1, 4:] = 0.0
    before = [w.copy() for w in model.get_weights()]
    gated = keras_lstm.from_keras(model)
    np.testing.assert_allclose(gated(x), model(x), atol=1e-6)
    kinds = [type(layer).__name__ for layer in gated._flatten_layers(include_self=False)]
    assert "LSTM" not in kinds and kinds.count("GatedLSTM") == 4
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_converters_reject_what_they_cannot_convert(x):
    with pytest.raises(TypeError, match="`torch_lstm` must be a torch.nn.LSTM"):
        keras_lstm.from_torch(torch.nn.GRU(3, 4))
    peep = GatedLSTM(4, peephole=True, zoneout_h=0.1)
    peep(x)
    with pytest.raises(ValueError, match="torch.nn.LSTM has no peephole, zoneout_h"):
        keras_lstm.to_torch(peep)
    backwards = GatedLSTM(4, go_backwards=True)
    backwards(x)
    with pytest.raises(ValueError, match="go_backwards=True"):
        keras_lstm.to_torch(backwards)
    with pytest.raises(ValueError, match="is not built yet"):
        keras_lstm.to_torch(GatedLSTM(4))
    with pytest.raises(TypeError, match="`layer` must be a GatedLSTM, a keras.layers.LSTM"):
        keras_lstm.to_torch(keras.layers.Dense(3))
    summed = keras.layers.Bidirectional(GatedLSTM(4), merge_mode="sum")
    summed(x)
    with pytest.raises(ValueError, match="`merge_mode` must be 'concat'"):
        keras_lstm.to_torch(summed)
    mixed = keras.Sequential(
        [keras.Input((6, 4)), GatedLSTM(4, return_sequences=True), GatedLSTM(3)]
    )
    with pytest.raises(ValueError, match="must share `units`"):
        keras_lstm.to_torch(mixed)
    with pytest.raises(TypeError, match="`lstm` must be a keras.layers.LSTM"):
        keras_lstm.from_keras(GatedLSTM(3))
    with pytest.raises(ValueError, match="has no keras.layers.LSTM layer"):
        keras_lstm.from_keras(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_missing_torch_raises_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-lstm\[torch\]'"):
        keras_lstm.to_torch(GatedLSTM(3))

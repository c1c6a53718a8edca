"""GatedLSTM takes every argument keras.layers.LSTM, LSTMCell and RNN take, with Keras's
meaning; bad argument types, a refused lambda and a stateful layer's partial batch
each get one clear error.

The argument lists are read from the installed Keras (signatures, and the
`kwargs.pop("...")`/`kwargs.get("...")` names in its sources), so a new Keras
argument fails here before it fails a user.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_lstm import GatedLSTM, GatedLSTMCell, _routes, kernels

KERAS_RNN = Path(keras.__file__).parent / "src" / "layers" / "rnn"

# A valid value, other than the default, for each argument Keras's classes take.
EXAMPLE_VALUES = {
    "units": 4,
    "activation": "relu",
    "recurrent_activation": "hard_sigmoid",
    "use_bias": False,
    "kernel_initializer": "he_normal",
    "recurrent_initializer": "glorot_uniform",
    "bias_initializer": "ones",
    "unit_forget_bias": False,
    "kernel_regularizer": "l2",
    "recurrent_regularizer": "l1",
    "bias_regularizer": "l2",
    "activity_regularizer": "l2",
    "kernel_constraint": "non_neg",
    "recurrent_constraint": "max_norm",
    "bias_constraint": "non_neg",
    "dropout": 0.1,
    "recurrent_dropout": 0.2,
    "seed": 3,
    "return_sequences": True,
    "return_state": True,
    "go_backwards": True,
    "stateful": True,
    "unroll": True,
    "use_cudnn": False,
    "zero_output_for_mask": True,
    "implementation": 1,
    "dtype": "float64",
    "name": "renamed",
    "trainable": False,
    "autocast": False,
    "input_shape": (5, 3),
    "input_dim": 3,
}
# Keras's RNN takes a `cell`; GatedLSTM builds its own.
NOT_FOR_GATED_LSTM = {"cell"}


def _keras_arguments(cls, source: str) -> set[str]:
    names = {
        name
        for klass in inspect.getmro(cls)
        if klass.__module__.startswith("keras")
        for name, parameter in inspect.signature(klass.__init__).parameters.items()
        if name != "self"
        and parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    text = (KERAS_RNN / source).read_text()
    names |= set(re.findall(r"kwargs\.(?:pop|get)\(\s*\"(\w+)\"", text))
    return names


@pytest.mark.parametrize(
    "keras_class, ours, source",
    [
        (keras.layers.LSTM, GatedLSTM, "lstm.py"),
        (keras.layers.RNN, GatedLSTM, "rnn.py"),
        (keras.layers.LSTMCell, GatedLSTMCell, "lstm.py"),
    ],
    ids=["LSTM", "RNN", "LSTMCell"],
)
def test_every_argument_keras_takes_is_taken(keras_class, ours, source):
    names = _keras_arguments(keras_class, source) - NOT_FOR_GATED_LSTM
    unknown = names - set(EXAMPLE_VALUES)
    assert not unknown, f"Keras takes arguments this test does not know yet: {unknown}"
    for name in sorted(names):
        if ours is GatedLSTMCell and name in (
            "return_sequences",
            "return_state",
            "go_backwards",
            "stateful",
            "unroll",
            "use_cudnn",
            "zero_output_for_mask",
        ):
            continue  # layer arguments, which Keras's cell refuses too
        kwargs = {"units": 4, name: EXAMPLE_VALUES[name]}
        keras_class_kwargs = dict(kwargs)
        if keras_class is keras.layers.RNN:
            keras_class_kwargs.pop("units")
            keras_class_kwargs["cell"] = keras.layers.LSTMCell(4)
        keras_class(**keras_class_kwargs)  # Keras takes it...
        ours(**kwargs)  # ...and so does ours.


def test_keras_lstm_config_loads_into_gated_lstm():
    lstm = keras.layers.LSTM(
        6,
        **{
            name: EXAMPLE_VALUES[name]
            for name in (
                "activation",
                "recurrent_activation",
                "use_bias",
                "unit_forget_bias",
                "kernel_regularizer",
                "recurrent_constraint",
                "dropout",
                "recurrent_dropout",
                "seed",
                "return_sequences",
                "return_state",
                "go_backwards",
                "unroll",
                "zero_output_for_mask",
                "activity_regularizer",
            )
        },
        implementation=1,
    )
    config = lstm.get_config()
    layer = GatedLSTM.from_config(config)
    ours = layer.get_config()
    for key, value in config.items():
        if key != "name":
            assert ours[key] == value, key


@pytest.mark.parametrize("implementation", [1, 2])
def test_implementation_is_taken_and_changes_nothing(implementation, rng):
    x = rng.standard_normal((3, 5, 2)).astype("float32")
    reference = GatedLSTM(4, seed=1)
    layer = GatedLSTM(4, seed=1, implementation=implementation)
    reference(x)
    layer(x)
    layer.set_weights(reference.get_weights())
    assert layer.cell.implementation == implementation
    np.testing.assert_allclose(layer(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("value", [0, 3, "2", True])
def test_implementation_other_than_one_or_two_is_refused(value):
    with pytest.raises(ValueError, match=r"`implementation` must be 1 or 2"):
        GatedLSTM(4, implementation=value)


LAYER_FLAGS = [
    "return_sequences",
    "return_state",
    "go_backwards",
    "stateful",
    "unroll",
    "zero_output_for_mask",
]
CELL_FLAGS = ["use_bias", "unit_forget_bias", "peephole", "layer_norm", "cifg"]


@pytest.mark.parametrize("argument", LAYER_FLAGS + CELL_FLAGS)
@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_boolean_arguments_refuse_other_types(argument, value):
    with pytest.raises(TypeError, match=rf"`{argument}` must be True or False, got {value!r}"):
        GatedLSTM(4, **{argument: value})


@pytest.mark.parametrize("argument", CELL_FLAGS)
def test_cell_boolean_arguments_refuse_other_types(argument):
    with pytest.raises(TypeError, match=rf"`{argument}` must be True or False"):
        GatedLSTMCell(4, **{argument: "True"})


def test_numpy_booleans_are_booleans():
    layer = GatedLSTM(4, use_bias=np.bool_(False), return_sequences=np.bool_(True))
    assert layer.use_bias is False and layer.return_sequences is True


def _halve(t):
    return t * 0.5


def test_a_saved_lambda_activation_names_safe_mode(tmp_path, rng):
    x = rng.standard_normal((2, 4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4, 3)), GatedLSTM(5, activation=lambda t: t * 0.5)])
    expected = model(x)
    path = tmp_path / "lambda.keras"
    with pytest.warns(UserWarning, match="lambda"):
        model.save(path)
    with pytest.raises(ValueError, match=r"`activation` is a Python lambda .* safe_mode refused"):
        keras.saving.load_model(path)
    loaded = keras.saving.load_model(path, safe_mode=False)
    np.testing.assert_allclose(loaded(x), expected, atol=1e-6)


def _stateful_model():
    return keras.Sequential([keras.Input((4, 2), batch_size=3), GatedLSTM(5, stateful=True)])


@pytest.fixture(params=["native", "while_loop"])
def path(request, monkeypatch):
    if request.param == "while_loop":
        monkeypatch.setattr(_routes, "native_reason", lambda jit_compile=False: "off in this test")
    elif not kernels.native_available():
        pytest.skip("the native kernel is not built here")
    return request.param


STATEFUL_MESSAGE = (
    r"`gated_lstm\w*` is stateful and was built for batches of 3 rows, but got a batch of "
    r".*use a batch_size that divides the number of samples, or drop the remainder"
)


def test_stateful_partial_last_batch_in_predict_is_one_clear_error(path):
    model = _stateful_model()
    x = np.ones((4, 4, 2), "float32")
    with pytest.raises(Exception, match=STATEFUL_MESSAGE):
        model.predict(x, batch_size=3, verbose=0)
    model.predict(x[:3], batch_size=3, verbose=0)  # whole batches still run


def test_stateful_batch_of_other_size_called_directly_is_refused(path):
    model = _stateful_model()
    with pytest.raises(ValueError, match=STATEFUL_MESSAGE.replace(".*", "1.*", 1)):
        model(np.ones((1, 4, 2), "float32"))

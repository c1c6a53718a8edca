"""Configs round-trip, and `.keras` files load in a fresh process that imports only keras_lstm."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

from keras_lstm import GatedLSTM, GatedLSTMCell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_config_round_trips_every_argument():
    layer = GatedLSTM(
        6,
        activation="relu",
        recurrent_activation="hard_sigmoid",
        use_bias=False,
        kernel_initializer="he_normal",
        recurrent_initializer="glorot_normal",
        bias_initializer="ones",
        unit_forget_bias=False,
        kernel_regularizer="l2",
        recurrent_regularizer="l1",
        bias_regularizer="l2",
        activity_regularizer="l1",
        kernel_constraint="non_neg",
        recurrent_constraint="non_neg",
        bias_constraint="unit_norm",
        dropout=0.1,
        recurrent_dropout=0.2,
        seed=5,
        return_sequences=True,
        return_state=True,
        go_backwards=True,
        stateful=True,
        unroll=True,
        use_cudnn=False,
        name="configured",
    )
    config = layer.get_config()
    clone = GatedLSTM.from_config(config)
    assert clone.get_config() == config
    assert clone.units == 6 and clone.dropout == 0.1 and clone.recurrent_dropout == 0.2
    assert clone.go_backwards and clone.stateful and clone.unroll and clone.use_cudnn is False
    assert keras.activations.serialize(clone.activation) == "relu"
    assert isinstance(clone.cell, GatedLSTMCell)


def _models():
    """One model of each shape a user builds, keyed by a file name."""
    features, steps = 3, 5
    inputs = keras.Input((steps, features))

    def seq(*layers, shape=(steps, features), dtype="float32"):
        return keras.Sequential([keras.Input(shape, dtype=dtype), *layers])

    functional_out, h, c = GatedLSTM(4, return_sequences=True, return_state=True)(inputs)
    functional = keras.Model(inputs, [keras.layers.GlobalMaxPooling1D()(functional_out), h, c])
    return {
        "layer": seq(GatedLSTM(4), keras.layers.Dense(1)),
        "rnn_cell": seq(keras.layers.RNN(GatedLSTMCell(4))),
        "stacked": seq(
            keras.layers.RNN([GatedLSTMCell(4), GatedLSTMCell(2)], return_sequences=True)
        ),
        "bidirectional": seq(keras.layers.Bidirectional(GatedLSTM(4, return_sequences=True))),
        "bidirectional_cell": seq(keras.layers.Bidirectional(keras.layers.RNN(GatedLSTMCell(4)))),
        "masked": seq(keras.layers.Masking(0.0), GatedLSTM(4, go_backwards=True)),
        "embedding": seq(
            keras.layers.Embedding(9, 3, mask_zero=True),
            GatedLSTM(4),
            shape=(steps,),
            dtype="int32",
        ),
        "functional": functional,
        "stateful": keras.Sequential(
            [keras.Input(batch_shape=(2, steps, features)), GatedLSTM(4, stateful=True)]
        ),
    }


LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras_lstm  # registers the classes; nothing else of ours is imported
    import keras
    folder = sys.argv[1]
    report = {}
    for name in json.load(open(folder + "/names.json")):
        model = keras.saving.load_model(f"{folder}/{name}.keras")
        data = np.load(f"{folder}/{name}.npz")
        got = model.predict(data["x"], verbose=0)
        got = got if isinstance(got, list) else [got]
        report[name] = max(float(np.max(np.abs(g - data[f"y{i}"]))) for i, g in enumerate(got))
    print(json.dumps(report))
    """
)


def test_saved_models_load_in_a_fresh_process_with_the_same_outputs(tmp_path):
    rng = np.random.default_rng(0)
    names = []
    for name, model in _models().items():
        if model.inputs[0].dtype == "int32":
            x = rng.integers(0, 9, size=(2, 5)).astype("int32")
            x[0, 3:] = 0
        else:
            x = rng.normal(size=(2, 5, 3)).astype("float32")
            x[1, 4] = 0.0
        out = model.predict(x, verbose=0)
        out = out if isinstance(out, list) else [out]
        model.save(tmp_path / f"{name}.keras")
        np.savez(tmp_path / f"{name}.npz", x=x, **{f"y{i}": o for i, o in enumerate(out)})
        names.append(name)
    (tmp_path / "names.json").write_text(json.dumps(names))

    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: the installed or PYTHONPATH package is what loads
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(names)
    for name, error in errors.items():
        assert error < 1e-6, f"{name}: max abs difference {error}"

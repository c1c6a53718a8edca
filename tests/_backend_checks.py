"""Run GatedLSTM through one Keras backend and write every result to an .npz file.

`tests/test_backends.py` imports this module under TensorFlow to compute the
reference arrays, then runs it as a script once per other backend, each in its
own process (KERAS_BACKEND must be set before keras is imported):

    KERAS_BACKEND=jax python tests/_backend_checks.py CASES.npz OUT.npz \
        --load model_tensorflow.keras --save model_jax.keras

Every result is a plain NumPy array under a name such as `masked/sequence`,
so the test compares backends key by key.
"""

from __future__ import annotations

import argparse
import os
import sys

import keras
import numpy as np
from keras import ops

# Appended: an installed keras_lstm comes first (the repository root serves a checkout).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_lstm import GatedLSTM  # noqa: E402

BATCH, TIME, FEATURES, UNITS = 4, 6, 3, 5

# name -> (GatedLSTM arguments, call arguments taken from the cases file)
OUTPUT_CASES = {
    "last": ({}, ()),
    "sequence": ({"return_sequences": True}, ()),
    "state": ({"return_state": True}, ()),
    "backwards": ({"return_sequences": True, "return_state": True, "go_backwards": True}, ()),
    "masked": ({"return_sequences": True, "return_state": True}, ("mask",)),
    "masked_backwards": (
        {"return_sequences": True, "return_state": True, "go_backwards": True},
        ("mask",),
    ),
    "initial_state": ({"return_sequences": True, "return_state": True}, ("initial_state",)),
    "unrolled": ({"return_sequences": True, "return_state": True, "unroll": True}, ("mask",)),
}


def make_cases(seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, weights and cotangents shared by every backend."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype("float32")

    lengths = np.array([TIME, 4, 1, 5])
    return {
        "x": normal(BATCH, TIME, FEATURES),
        "x_next": normal(BATCH, TIME, FEATURES),
        "y": normal(BATCH, 1),
        "mask": np.arange(TIME)[None, :] < lengths[:, None],
        "h0": normal(BATCH, UNITS, scale=0.5),
        "c0": normal(BATCH, UNITS, scale=0.5),
        "kernel": normal(FEATURES, 4 * UNITS, scale=0.6),
        "recurrent_kernel": normal(UNITS, 4 * UNITS, scale=0.6),
        "bias": normal(4 * UNITS, scale=0.3),
        "dense_kernel": normal(UNITS, 1, scale=0.5),
        "dense_bias": np.zeros((1,), "float32"),
        "cot_sequence": normal(BATCH, TIME, UNITS),
        "cot_h": normal(BATCH, UNITS),
        "cot_c": normal(BATCH, UNITS),
    }


def _layer(cases, layer_class=GatedLSTM, **kwargs):
    layer = layer_class(UNITS, **kwargs)
    layer.build((BATCH, TIME, FEATURES))
    layer.set_weights([cases["kernel"], cases["recurrent_kernel"], cases["bias"]])
    return layer


def _call_args(cases, names):
    args = {}
    if "mask" in names:
        args["mask"] = ops.convert_to_tensor(cases["mask"])
    if "initial_state" in names:
        args["initial_state"] = [
            ops.convert_to_tensor(cases["h0"]),
            ops.convert_to_tensor(cases["c0"]),
        ]
    return args


def outputs(cases, layer_class=GatedLSTM) -> dict[str, np.ndarray]:
    """Forward outputs of every case in OUTPUT_CASES, plus a stateful run."""
    results = {}
    x = ops.convert_to_tensor(cases["x"])
    for name, (layer_args, call_names) in OUTPUT_CASES.items():
        out = _layer(cases, layer_class, **layer_args)(x, **_call_args(cases, call_names))
        out = out if isinstance(out, (list, tuple)) else [out]
        for part, value in zip(("output", "h", "c"), out, strict=False):
            results[f"{name}/{part}"] = ops.convert_to_numpy(value)

    # Stateful: the second batch starts from the first batch's final state, and
    # reset_state() brings back the zero state.
    layer = _layer(cases, layer_class, stateful=True, return_sequences=True)
    results["stateful/first"] = ops.convert_to_numpy(layer(x))
    results["stateful/second"] = ops.convert_to_numpy(layer(cases["x_next"]))
    results["stateful/h_after_second"] = ops.convert_to_numpy(layer.states[0])
    layer.reset_state()
    results["stateful/after_reset"] = ops.convert_to_numpy(layer(cases["x_next"]))
    return results


def _loss(cases, out):
    total = 0.0
    for value, name in zip(out, ("cot_sequence", "cot_h", "cot_c"), strict=True):
        total = total + ops.sum(value * ops.convert_to_tensor(cases[name]))
    return total


def gradients(cases) -> dict[str, np.ndarray]:
    """d(loss)/d(weights, inputs) through a masked layer, by the backend's own autodiff."""
    layer = _layer(cases, return_sequences=True, return_state=True)
    mask = ops.convert_to_tensor(cases["mask"])
    names = ["kernel", "recurrent_kernel", "bias"]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(cases["x"])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = _loss(cases, layer(x, mask=mask))
        grads = tape.gradient(loss, [*layer.trainable_variables, x])
    elif backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable, x):
            out, _ = layer.stateless_call(trainable, non_trainable, x, mask=mask)
            return _loss(cases, out)

        weight_grads, x_grad = jax.grad(loss_fn, argnums=(0, 1))(trainable, cases["x"])
        grads = [*weight_grads, x_grad]
    elif backend == "torch":
        import torch

        x = torch.tensor(cases["x"], requires_grad=True)
        _loss(cases, layer(x, mask=mask)).backward()
        grads = [v.value.grad for v in layer.trainable_variables] + [x.grad]
    else:
        raise ValueError(f"No gradient check written for backend {backend!r}.")
    by_path = dict(zip([v.path for v in layer.trainable_variables] + ["x"], grads, strict=True))
    results = {}
    for name in names:
        (path,) = [p for p in by_path if p.endswith("/" + name)]
        results[f"grad/{name}"] = ops.convert_to_numpy(by_path[path])
    results["grad/x"] = ops.convert_to_numpy(by_path["x"])
    return results


def forecaster(cases) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((TIME, FEATURES)), GatedLSTM(UNITS, name="lstm"), keras.layers.Dense(1)]
    )
    model.set_weights(
        [
            cases["kernel"],
            cases["recurrent_kernel"],
            cases["bias"],
            cases["dense_kernel"],
            cases["dense_bias"],
        ]
    )
    return model


def training(cases) -> tuple[dict[str, np.ndarray], keras.Model]:
    """Four SGD steps through model.fit, compiled where the backend can (torch cannot)."""
    model = forecaster(cases)
    jit = keras.backend.backend() != "torch"
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=jit)
    history = model.fit(
        cases["x"], cases["y"], batch_size=2, epochs=2, shuffle=False, verbose=0
    ).history
    results = {f"fit/weight_{i}": w for i, w in enumerate(model.get_weights())}
    results["fit/loss"] = np.asarray(history["loss"], "float32")
    results["fit/predictions"] = model.predict(cases["x"], verbose=0)
    return results, model


def stateful_training(cases) -> dict[str, np.ndarray]:
    """model.fit on a stateful forecaster: each batch starts from the last one's state."""
    model = keras.Sequential(
        [
            keras.Input((TIME, FEATURES), batch_size=2),
            GatedLSTM(UNITS, stateful=True, name="lstm"),
            keras.layers.Dense(1),
        ]
    )
    model.set_weights(forecaster(cases).get_weights())
    jit = keras.backend.backend() != "torch"
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=jit)
    model.fit(cases["x"], cases["y"], batch_size=2, epochs=2, shuffle=False, verbose=0)
    results = {f"stateful_fit/weight_{i}": w for i, w in enumerate(model.get_weights())}
    results["stateful_fit/h"] = ops.convert_to_numpy(model.get_layer("lstm").states[0])
    return results


def mixed_precision(cases) -> dict[str, np.ndarray]:
    """A stateful layer under mixed_float16: outputs, state variables, reset_state."""
    layer = _layer(cases, stateful=True, return_sequences=True, dtype="mixed_float16")
    first = layer(cases["x"])
    second = layer(cases["x_next"])
    state_dtypes = [str(ops.convert_to_numpy(s).dtype) for s in layer.states]
    layer.reset_state()
    zeros = [float(np.abs(ops.convert_to_numpy(s)).max()) for s in layer.states]
    return {
        "mixed/first": ops.convert_to_numpy(first),
        "mixed/second": ops.convert_to_numpy(second),
        "mixed/output_dtype": np.array(keras.backend.standardize_dtype(second.dtype)),
        "mixed/state_dtypes": np.array(state_dtypes),
        "mixed/max_state_after_reset": np.array(max(zeros)),
    }


def run_all(cases) -> tuple[dict[str, np.ndarray], keras.Model]:
    results = {
        **outputs(cases),
        **gradients(cases),
        **mixed_precision(cases),
        **stateful_training(cases),
    }
    fit_results, model = training(cases)
    results.update(fit_results)
    return results, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases")
    parser.add_argument("out")
    parser.add_argument("--load", help="a .keras file saved under another backend")
    parser.add_argument("--save", help="where to save this backend's trained model")
    args = parser.parse_args(argv)
    with np.load(args.cases) as data:
        cases = {k: data[k] for k in data.files}
    results, model = run_all(cases)
    results["backend"] = np.array(keras.backend.backend())
    if args.load:
        # compile=False: the file carries TensorFlow's jit_compile=True, which
        # torch would honour with a slow torch.compile of the time loop.
        loaded = keras.saving.load_model(args.load, compile=False)
        results["loaded/predictions"] = loaded.predict(cases["x"], verbose=0)
        for i, w in enumerate(loaded.get_weights()):
            results[f"loaded/weight_{i}"] = w
    if args.save:
        model.save(args.save)
    np.savez(args.out, **results)


if __name__ == "__main__":
    main()

"""Measures how far GatedLSTM is from keras.layers.LSTM with the same weights.

Run `python -m benchmarks.parity`. For each configuration it prints the largest
absolute difference of the outputs (sequence and final states) and of the
gradients with respect to the inputs and every weight, eager and under
`jit_compile=True`, for each path the layer can take: the fused op with the
native kernel, the fused op built from TensorFlow ops, and Keras's step loop
around the cell. The tests assert these stay under 1e-5; this prints the
actual figures (float32, CPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_lstm import GatedLSTM, kernels  # noqa: E402
from keras_lstm._routes import Route  # noqa: E402

B, T, D, H = 8, 20, 6, 16


def _configs(rng):
    gaps = np.ones((B, T), bool)
    gaps[0, 15:] = False  # right-padded
    gaps[1, [2, 7, 8]] = False  # with gaps
    state = [tf.constant(rng.normal(size=(B, H)).astype("float32")) for _ in range(2)]
    return {
        "last output": ({}, {}),
        "sequences + states": ({"return_sequences": True, "return_state": True}, {}),
        "go_backwards": ({"return_sequences": True, "go_backwards": True}, {}),
        "mask (padded + gaps)": ({"return_sequences": True}, {"mask": tf.constant(gaps)}),
        "initial_state": ({"return_state": True}, {"initial_state": state}),
        "unroll": ({"return_sequences": True, "unroll": True}, {}),
    }


def _run(layer, x, jit, call_kwargs):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = keras.tree.flatten(layer(x, **call_kwargs))
            loss = sum(tf.reduce_sum(o * tf.sin(tf.cast(tf.size(o), o.dtype) + o)) for o in outputs)
        return outputs, tape.gradient(loss, [x, *layer.trainable_weights])

    if jit:
        step = tf.function(step, jit_compile=True)
    outputs, grads = step(tf.constant(x))
    return [np.asarray(v) for v in outputs], [np.asarray(v) for v in grads]


def _max_diff(a, b):
    """Largest absolute difference, and that difference relative to the largest value."""
    diff = max(float(np.max(np.abs(p - q))) for p, q in zip(a, b, strict=True))
    scale = max(float(np.max(np.abs(q))) for q in b)
    return diff, diff / scale


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype("float32")
    paths = {
        "native kernel": lambda: kernels.native_available(),
        "TF-ops fused": None,
        "step loop": None,
    }
    tf.get_logger().setLevel("ERROR")  # each configuration traces anew, on purpose
    print(f"(B, T, D, H) = {(B, T, D, H)}, float32; max |ours - keras.layers.LSTM|")
    print("(gradients: absolute, and relative to the largest gradient)")
    header = f"{'configuration':<22} {'path':<14} {'mode':<6} {'outputs':>9} {'gradients':>10}"
    print(f"{header} {'relative':>9}")
    worst = worst_relative = 0.0
    for name, (layer_kwargs, call_kwargs) in _configs(rng).items():
        reference = keras.layers.LSTM(H, **layer_kwargs)
        reference.build((B, T, D))
        reference.set_weights(
            [rng.normal(0, 0.4, w.shape).astype("float32") for w in reference.weights]
        )
        for path in paths:
            if path == "native kernel" and not paths[path]():
                continue
            ours = GatedLSTM(H, **layer_kwargs)
            ours.build((B, T, D))
            ours.set_weights(reference.get_weights())
            for jit in (False, True):
                # Under XLA the native kernel runs as a custom call when its XLA
                # library is built; the other paths are pinned.
                ours._pinned_route = {
                    "native kernel": None,
                    "TF-ops fused": Route.LOOP_XLA if jit else Route.LOOP,
                    "step loop": Route.STEP_LOOP,
                }[path]
                got_out, got_grad = _run(ours, x, jit, call_kwargs)
                want_out, want_grad = _run(reference, x, jit, call_kwargs)
                out_err, _ = _max_diff(got_out, want_out)
                grad_err, grad_relative = _max_diff(got_grad, want_grad)
                worst = max(worst, out_err, grad_err)
                worst_relative = max(worst_relative, grad_relative)
                mode = "jit" if jit else "eager"
                row = f"{name:<22} {path:<14} {mode:<6} {out_err:9.1e} {grad_err:10.1e}"
                print(f"{row} {grad_relative:9.1e}")
    print(
        f"largest difference: {worst:.1e}; largest relative gradient difference: "
        f"{worst_relative:.1e}"
    )


if __name__ == "__main__":
    main()

"""Where the time of one GatedLSTM training step, or one inference call, goes.

Run `python -m benchmarks.profile [--sizes 64x100x32x128,...]`. Each part of
the fused op's training step is timed alone (median of several calls): the
native forward pass (input projection included), the native backward
recurrence, the three weight/input gradient matmuls, the input projection as
one TensorFlow matmul (what the TF-ops path does), and the recurrences
compiled by XLA.

With `--inference`, one inference call is taken apart instead, from the
outside in: `model.predict_on_batch` (Keras's per-call cost included), the
model and the layer alone under `tf.function`, the native op alone, and the
matmuls an LSTM must do (x W for all steps in one product, then T products
h U), next to `torch.nn.LSTM` under `torch.no_grad()` in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_ms(fn, calls: int = 15) -> float:
    fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def profile(size):
    import tensorflow as tf

    from keras_lstm.kernels import _native, _while_loop

    batch, steps, features, units = size
    x = tf.random.normal((steps * batch, features))
    w = tf.random.normal((features, 4 * units)) * 0.1
    u = tf.random.normal((units, 4 * units)) * 0.05
    xz = tf.reshape(tf.matmul(x, w), (steps, batch, 4 * units))
    h0 = c0 = tf.zeros((batch, units))
    dz = tf.random.normal((steps * batch, 4 * units))
    h_prev = tf.random.normal((steps * batch, units))
    parts = {
        "input projection x W (one matmul)": lambda: tf.matmul(x, w).numpy(),
        "dW = X^T dZ (one matmul)": lambda: tf.matmul(x, dz, transpose_a=True).numpy(),
        "dx = dZ W^T (one matmul)": lambda: tf.matmul(dz, w, transpose_b=True).numpy(),
        "dU = H^T dZ (one matmul)": lambda: tf.matmul(h_prev, dz, transpose_a=True).numpy(),
    }
    module = _native.native_module()
    if module is not None:
        none = tf.zeros((0,))
        bias = tf.zeros((4 * units,))
        xs = tf.reshape(x, (steps, batch, features))
        h, c, g, *_ = module.keras_lstm_sequence(
            xs, w, bias, u, h0, c0, *[none] * 7, tf.zeros((0,), tf.int32)
        )
        parts["native forward, projection included (training)"] = lambda: _native.lstm_sequence(
            xs, w, bias, u, h0, c0
        )[2].numpy()
        parts["native forward, projection included (inference)"] = lambda: _native.lstm_sequence(
            xs, w, bias, u, h0, c0, keep_for_gradient=False, return_sequences=False
        )[2].numpy()
        # recurrent_kernel, h0, c0, mask, c, gates, dh, dc, dh_last, dc_last, then
        # the absent recurrent mask, peephole, projection, zoneout masks, c_computed,
        # layer norm's weights and norms.
        parts["native backward recurrence"] = lambda: module.keras_lstm_sequence_grad(
            u, h0, c0, none, c, g, h, c, none, none, *[none] * 8
        )[0].numpy()
    xla_forward = tf.function(
        lambda xz: _while_loop._forward(xz, u, h0, c0, None), jit_compile=True
    )
    h, c, g = xla_forward(xz)
    xla_backward = tf.function(
        lambda c, g, h: _while_loop._backward(u, c0, None, c, g, h, c), jit_compile=True
    )
    parts["XLA forward recurrence"] = lambda: xla_forward(xz)[0].numpy()
    parts["XLA backward recurrence"] = lambda: xla_backward(c, g, h)[0].numpy()
    step_gemm_a = tf.random.normal((batch, units))
    parts[f"one step matmul ({batch}x{units}) @ ({units}x{4 * units}), eager op"] = lambda: (
        tf.matmul(step_gemm_a, u).numpy()
    )
    return {name: _median_ms(fn) for name, fn in parts.items()}


def profile_inference(size, calls: int = 41):
    """One inference call at `size`, from `predict_on_batch` down to the matmuls (ms)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_lstm import GatedLSTM
    from keras_lstm.kernels import _native

    batch, steps, features, units = size
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, steps, features)).astype("float32")
    x = tf.constant(x_np)
    layer = GatedLSTM(units)
    model = keras.Sequential([keras.Input((steps, features)), layer])
    model.predict_on_batch(x_np)
    kernel, recurrent, bias = (tf.constant(w) for w in layer.get_weights())
    zeros = tf.zeros((batch, units))
    xs = tf.transpose(x, (1, 0, 2))

    model_fn = tf.function(lambda x: model(x, training=False))
    layer_fn = tf.function(lambda x: layer(x, training=False))
    op_fn = tf.function(
        lambda xs: _native.lstm_sequence(
            xs,
            kernel,
            bias,
            recurrent,
            zeros,
            zeros,
            keep_for_gradient=False,
            return_sequences=False,
        )[2]
    )
    x_flat = tf.reshape(xs, (-1, features))
    # A different h per step: the same product twice would be computed once.
    hs = tf.random.normal((steps, batch, units))

    @tf.function
    def matmuls(x_flat):
        out = [tf.matmul(x_flat, kernel)]
        out += [tf.matmul(hs[t], recurrent) for t in range(steps)]
        return [o[0, 0] for o in out]

    parts = {
        "model.predict_on_batch": lambda: model.predict_on_batch(x_np),
        "model under tf.function": lambda: model_fn(x).numpy(),
        "GatedLSTM layer under tf.function": lambda: layer_fn(x).numpy(),
        "native op alone under tf.function (inference)": lambda: op_fn(xs).numpy(),
        "matmul limit: x W once + T steps of h U": lambda: [v.numpy() for v in matmuls(x_flat)],
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        lstm = torch.nn.LSTM(features, units, batch_first=True)
        x_torch = torch.from_numpy(x_np)

        def torch_infer():
            with torch.no_grad():
                return lstm(x_torch)[0][:, -1].sum().item()

        parts[f"torch.nn.LSTM, no_grad ({torch.get_num_threads()} threads)"] = torch_infer
    return {name: _median_ms(fn, calls) for name, fn in parts.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--sizes", default="64x100x32x128,256x50x64x256,1x100x32x128")
    parser.add_argument(
        "--inference", action="store_true", help="take one inference call apart instead"
    )
    args = parser.parse_args(argv)
    from benchmarks.run import _parse_sizes

    for size in _parse_sizes(args.sizes):
        print(f"(B,T,D,H) = {size}")
        timings = profile_inference(size) if args.inference else profile(size)
        for name, ms in timings.items():
            print(f"  {name:<58} {ms:9.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

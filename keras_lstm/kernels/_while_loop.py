"""The LSTM recurrence in TensorFlow ops with its own gradient.

This is the path that runs under XLA (`jit_compile=True`), on GPUs and
wherever the native kernel is unavailable. The forward loop keeps only what
the backward loop needs (the four gate activations and the cell state of
every step); the backward loop carries `dh` and `dc` back through the
recurrent kernel, and the recurrent kernel's gradient is a single matmul over
all steps afterwards.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def _split_gates(gates):
    return tf.split(gates, 4, axis=-1)


def _forward(xs, recurrent_kernel, h0, c0, mask, project=None):
    """`xs` is the time-major `x W + b`, or `x` itself when `project` maps a step to it."""
    steps = tf.shape(xs)[0]
    dtype = xs.dtype
    xs_ta = tf.TensorArray(dtype, size=steps).unstack(xs)
    mask_ta = None if mask is None else tf.TensorArray(tf.bool, size=steps).unstack(mask)
    h_ta = tf.TensorArray(dtype, size=steps, element_shape=h0.shape)
    c_ta = tf.TensorArray(dtype, size=steps, element_shape=c0.shape)
    g_ta = tf.TensorArray(
        dtype, size=steps, element_shape=h0.shape[:1] + recurrent_kernel.shape[1:]
    )

    def body(t, h, c, h_ta, c_ta, g_ta):
        x_t = xs_ta.read(t)
        z = (x_t if project is None else project(x_t)) + tf.matmul(h, recurrent_kernel)
        z_i, z_f, z_g, z_o = _split_gates(z)
        i, f, g, o = tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_g), tf.sigmoid(z_o)
        c_new = f * c + i * g
        h_new = o * tf.tanh(c_new)
        if mask_ta is not None:
            keep = mask_ta.read(t)[:, None]
            h_new = tf.where(keep, h_new, h)
            c_new = tf.where(keep, c_new, c)
        return (
            t + 1,
            h_new,
            c_new,
            h_ta.write(t, h_new),
            c_ta.write(t, c_new),
            g_ta.write(t, tf.concat([i, f, g, o], axis=-1)),
        )

    _, _, _, h_ta, c_ta, g_ta = tf.while_loop(
        lambda t, *_: t < steps,
        body,
        (tf.constant(0), h0, c0, h_ta, c_ta, g_ta),
        maximum_iterations=steps,
    )
    return h_ta.stack(), c_ta.stack(), g_ta.stack()


def _backward(recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq):
    steps = tf.shape(gates)[0]
    dtype = gates.dtype
    g_ta = tf.TensorArray(dtype, size=steps).unstack(gates)
    c_ta = tf.TensorArray(dtype, size=steps).unstack(c_seq)
    c_prev_ta = tf.TensorArray(dtype, size=steps).unstack(tf.concat([c0[None], c_seq[:-1]], axis=0))
    dh_ta = tf.TensorArray(dtype, size=steps).unstack(dh_seq)
    dc_ta = tf.TensorArray(dtype, size=steps).unstack(dc_seq)
    mask_ta = None if mask is None else tf.TensorArray(tf.bool, size=steps).unstack(mask)
    dz_ta = tf.TensorArray(dtype, size=steps, element_shape=gates.shape[1:])

    def body(k, dh, dc, dz_ta):
        t = steps - 1 - k
        dh = dh + dh_ta.read(t)
        dc = dc + dc_ta.read(t)
        i, f, g, o = _split_gates(g_ta.read(t))
        c = c_ta.read(t)
        c_prev = c_prev_ta.read(t)
        if mask_ta is not None:
            keep = mask_ta.read(t)[:, None]
            dh_step = tf.where(keep, dh, tf.zeros_like(dh))
            dc_step = tf.where(keep, dc, tf.zeros_like(dc))
        else:
            dh_step, dc_step = dh, dc
        tanh_c = tf.tanh(c)
        dct = dc_step + dh_step * o * (1 - tanh_c * tanh_c)
        dz = tf.concat(
            [
                dct * g * i * (1 - i),
                dct * c_prev * f * (1 - f),
                dct * i * (1 - g * g),
                dh_step * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        dh_prev = tf.matmul(dz, recurrent_kernel, transpose_b=True)
        dc_prev = dct * f
        if mask_ta is not None:
            dh_prev = tf.where(keep, dh_prev, dh)
            dc_prev = tf.where(keep, dc_prev, dc)
        return k + 1, dh_prev, dc_prev, dz_ta.write(t, dz)

    zeros = tf.zeros_like(c0)
    _, dh0, dc0, dz_ta = tf.while_loop(
        lambda k, *_: k < steps,
        body,
        (tf.constant(0), zeros, zeros, dz_ta),
        maximum_iterations=steps,
    )
    return dz_ta.stack(), dh0, dc0


def recurrent_kernel_grad(h0, h_seq, dz):
    """`sum_t h_{t-1}^T dz_t` as one matmul over all steps."""
    units = tf.shape(h0)[-1]
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # XLA copies a slice that feeds a matmul, and dz[1:] is 4x the size of
        # h: one matmul on a copy of the shifted h moves less (measured: 22.5
        # against 25.0 ms a training step at B=64, T=100, D=32, H=128).
        h_prev = tf.concat([h0[None], h_seq[:-1]], axis=0)
        return tf.matmul(
            tf.reshape(h_prev, (-1, units)), tf.reshape(dz, (-1, 4 * units)), transpose_a=True
        )
    # Two matmuls on leading-axis slices (which share their tensor's buffer)
    # instead of one on `concat([h0, h_seq[:-1]])`, which would copy every h.
    later = tf.matmul(
        tf.reshape(h_seq[:-1], (-1, units)), tf.reshape(dz[1:], (-1, 4 * units)), transpose_a=True
    )
    from keras_lstm.kernels._native import _is_zero_fill

    if _is_zero_fill(h0):  # the usual zero initial state adds nothing
        return later
    return later + tf.matmul(h0, dz[0], transpose_a=True)


def lstm_sequence_projecting(x, kernel, bias, recurrent_kernel, h0, c0, mask=None):
    """As `lstm_sequence`, but from time-major `x` (T, B, D), projecting each step in the loop.

    XLA on CPU runs this form faster than reading a precomputed `x W + b`
    (measured: 13 ms against 23 ms for the forward loop at B=64, T=100,
    D=32, H=128). The gradients of `x`, `kernel` and `bias` are still single
    matmuls (or a sum) over all steps.
    """
    features = x.shape[-1]

    def grads_of_projection(x, kernel, dz):
        flat_dz = tf.reshape(dz, (-1, dz.shape[-1]))
        dx = tf.reshape(tf.matmul(flat_dz, kernel, transpose_b=True), tf.shape(x))
        dkernel = tf.matmul(tf.reshape(x, (-1, features)), flat_dz, transpose_a=True)
        return dx, dkernel, tf.reduce_sum(flat_dz, axis=0)

    if bias is None:

        @tf.custom_gradient
        def run(x, kernel, recurrent_kernel, h0, c0):
            h_seq, c_seq, gates = _forward(
                x, recurrent_kernel, h0, c0, mask, project=lambda x_t: tf.matmul(x_t, kernel)
            )

            def grad(dh_seq, dc_seq):
                dz, dh0, dc0 = _backward(recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq)
                dx, dkernel, _ = grads_of_projection(x, kernel, dz)
                return dx, dkernel, recurrent_kernel_grad(h0, h_seq, dz), dh0, dc0

            return (h_seq, c_seq), grad

        return run(x, kernel, recurrent_kernel, h0, c0)

    @tf.custom_gradient
    def run_with_bias(x, kernel, bias, recurrent_kernel, h0, c0):
        h_seq, c_seq, gates = _forward(
            x, recurrent_kernel, h0, c0, mask, project=lambda x_t: tf.matmul(x_t, kernel) + bias
        )

        def grad(dh_seq, dc_seq):
            dz, dh0, dc0 = _backward(recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq)
            dx, dkernel, dbias = grads_of_projection(x, kernel, dz)
            return dx, dkernel, dbias, recurrent_kernel_grad(h0, h_seq, dz), dh0, dc0

        return (h_seq, c_seq), grad

    return run_with_bias(x, kernel, bias, recurrent_kernel, h0, c0)


def lstm_sequence(xz, recurrent_kernel, h0, c0, mask=None):
    """Runs the recurrence over time-major `xz = x W + b` of shape (T, B, 4H).

    `mask` is an optional boolean (T, B); a `False` step keeps the row's
    previous `h` and `c`. Returns `(h_seq, c_seq)`, each (T, B, H).
    """

    @tf.custom_gradient
    def run(xz, recurrent_kernel, h0, c0):
        h_seq, c_seq, gates = _forward(xz, recurrent_kernel, h0, c0, mask)

        def grad(dh_seq, dc_seq):
            dz, dh0, dc0 = _backward(recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq)
            return dz, recurrent_kernel_grad(h0, h_seq, dz), dh0, dc0

        return (h_seq, c_seq), grad

    return run(xz, recurrent_kernel, h0, c0)

"""The LSTM recurrence in TensorFlow ops with its own gradient.

This is the path that runs under XLA (`jit_compile=True`), on GPUs and
wherever the native kernel is unavailable. The forward loop keeps only what
the backward loop needs (the four gate activations and the cell state of
every step); the backward loop carries `dh` and `dc` back through the
recurrent kernel, and the recurrent kernel's gradient is a single matmul over
all steps afterwards.
"""

from __future__ import annotations

import uuid

import tensorflow as tf

from keras_lstm.kernels._gradients import projection_grads, recurrent_kernel_grad


def _split_gates(gates):
    return tf.split(gates, 4, axis=1)


def _cell_step(z, c_prev):
    """The gate equations of one step from its pre-activations `z` (B, 4H), Keras's
    gate order: `(i, f, g, o, c, h)`, written once for every loop here."""
    z_i, z_f, z_g, z_o = _split_gates(z)
    i, f, g, o = tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_g), tf.sigmoid(z_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * tf.tanh(c)


def _keep(keep, new, previous):
    """Per row, the new state where the step is not masked, else the previous one."""
    return tuple(tf.where(keep, n, p) for n, p in zip(new, previous, strict=True))


def _forward(xs, recurrent_kernel, h0, c0, mask, project=None, recurrent_mask=None):
    """`xs` is the time-major `x W + b`, or `x` itself when `project` maps a step to it.

    Exports trace `lstm_sequence_for_inference` instead: tf2onnx turns this
    bounded loop's extra counter into an ONNX `Loop` that onnxruntime refuses
    (int64 against int32).
    """
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
        h_in = h if recurrent_mask is None else h * recurrent_mask  # recurrent dropout
        z = (x_t if project is None else project(x_t)) + tf.matmul(h_in, recurrent_kernel)
        i, f, g, o, c_new, h_new = _cell_step(z, c)
        if mask_ta is not None:
            h_new, c_new = _keep(mask_ta.read(t)[:, None], (h_new, c_new), (h, c))
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


def _backward(recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq, recurrent_mask=None):
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
        if recurrent_mask is not None:
            dh_prev = dh_prev * recurrent_mask
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


def lstm_sequence_projecting(
    x, kernel, bias, recurrent_kernel, h0, c0, mask=None, recurrent_mask=None
):
    """As `lstm_sequence_from_projected`, but from time-major `x` (T, B, D), each
    step projecting its own input in the loop (`bias` may be `None`).

    XLA's CPU backend runs this form faster than reading a precomputed
    `x W + b` (docs/performance.md). The gradients of `x`, `kernel` and `bias`
    are still single matmuls (or a sum) over all steps.
    """

    @tf.custom_gradient
    def run(x, kernel, recurrent_kernel, h0, c0, *bias):
        def project(x_t):
            z = tf.matmul(x_t, kernel)
            return z + bias[0] if bias else z

        h_seq, c_seq, gates = _forward(
            x, recurrent_kernel, h0, c0, mask, project=project, recurrent_mask=recurrent_mask
        )

        def grad(dh_seq, dc_seq):
            dz, dh0, dc0 = _backward(
                recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq, recurrent_mask
            )
            dx, dkernel = projection_grads(x, kernel, dz)
            drecurrent = recurrent_kernel_grad(h0, h_seq, dz, recurrent_mask)
            dbias = [tf.reduce_sum(tf.reshape(dz, (-1, dz.shape[-1])), axis=0)] if bias else []
            return (dx, dkernel, drecurrent, dh0, dc0, *dbias)

        return (h_seq, c_seq), grad

    return run(x, kernel, recurrent_kernel, h0, c0, *([] if bias is None else [bias]))


def lstm_sequence_without_lists(xz, recurrent_kernel, h0, c0, mask=None):
    """The forward recurrence alone, without TensorList ops (inference only).

    A `tf.TensorArray` becomes TensorList ops, which TFLite's converter can
    lower to builtins only when the batch size is fixed (otherwise they stay
    TensorFlow (Flex) ops that LiteRT's interpreter does not run), and which
    OpenVINO's converter does not take at all. Here the
    outputs are a loop-carried (T, B, H) tensor updated one row per step
    (`tensor_scatter_nd_update`), so the loop converts to a builtin `WHILE`
    (an OpenVINO `Loop`) with a free batch size and a free length. `xz` is the time-major
    `x W + b`. Returns `(h_seq, h_last, c_last)`.
    """
    steps = tf.shape(xz)[0]
    h_seq = tf.zeros(tf.concat([[steps], tf.shape(h0)], axis=0), xz.dtype)

    def body(t, h, c, h_seq):
        z = tf.gather(xz, t) + tf.matmul(h, recurrent_kernel)
        _, _, _, _, c_new, h_new = _cell_step(z, c)
        if mask is not None:
            h_new, c_new = _keep(tf.gather(mask, t)[:, None], (h_new, c_new), (h, c))
        return t + 1, h_new, c_new, tf.tensor_scatter_nd_update(h_seq, [[t]], h_new[None])

    _, h_last, c_last, h_seq = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), h0, c0, h_seq)
    )
    return h_seq, h_last, c_last


def lstm_sequence_for_tflite_fusion(x, kernel, bias, recurrent_kernel, h0, c0):
    """The recurrence as the composite function TFLite's converter fuses into one op.

    The converter (`prepare_composite_functions_tf.cc`, `ConvertKerasLSTMLayer`
    in `lstm_utils.cc`) replaces a function marked `api_implements="lstm_*"`
    whose arguments are `(inputs, init_h, init_c, kernel, recurrent_kernel,
    bias)` and whose results are `(last_output, outputs, h, c, runtime)` by
    `UNIDIRECTIONAL_SEQUENCE_LSTM`, as it did for the Keras 2 LSTM: when the
    initial states have static shapes (a fixed batch size), there is no mask
    argument, and only the first two results are used. Otherwise the
    function body runs as written (a loop without tensor lists). Time-major
    `x` (T, B, D). Returns `(h_seq, h_last, c_last)`; `c_last` is result 3,
    so a layer that returns its states is not fused.
    """
    if bias is None:
        bias = tf.zeros(kernel.shape[-1:], x.dtype)
    attributes = {
        "api_implements": f"lstm_{uuid.uuid4()}",
        "api_preferred_device": "CPU",
        "time_major": True,
        "go_backwards": False,
    }

    @tf.function(experimental_attributes=attributes, autograph=False)
    def standard_lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        steps, batch = tf.shape(inputs)[0], tf.shape(inputs)[1]
        xz = tf.matmul(tf.reshape(inputs, (-1, inputs.shape[-1])), kernel) + bias
        xz = tf.reshape(xz, (steps, batch, kernel.shape[-1]))
        h_seq, h_last, c_last = lstm_sequence_without_lists(xz, recurrent_kernel, init_h, init_c)
        return h_last, h_seq, h_last, c_last, tf.constant(0.0)

    last_output, h_seq, _, c_last, _ = standard_lstm(x, h0, c0, kernel, recurrent_kernel, bias)
    return h_seq, last_output, c_last


def lstm_sequence_for_inference(x, kernel, bias, recurrent_kernel, h0, c0, mask=None, lengths=None):
    """The forward recurrence alone, lean, for exported graphs.

    It keeps only `h` of each step (the training loop also keeps the gates
    and `c` for its backward pass), so a served model does less work;
    TensorFlow can still differentiate it (without our faster gradient).
    Without a mask it is written in the form tf2onnx recognises from
    `keras.layers.LSTM` (`tf2onnx/rewriter/lstm_tf2_rewriter.py`) and fuses
    into ONNX's `LSTM` op: each step `x_t W + h R`, `BiasAdd` of `b`, a
    four-way `Split`, `c = f * c + i * g`, `h = o * tanh(c)`, `h` written to
    a `TensorArray`. With `lengths` (B,) instead, each row stops at its
    length: its state holds and its outputs are zeros from then on, the
    `Select(t >= lengths, 0, h)` of `dynamic_rnn` that tf2onnx fuses into the
    op with `sequence_lens`. Time-major `x` (T, B, D).
    Returns `(h_seq, h_last, c_last)`.
    """
    steps = tf.shape(x)[0]
    x_ta = tf.TensorArray(x.dtype, size=steps).unstack(x)
    h_ta = tf.TensorArray(x.dtype, size=steps, element_shape=h0.shape)

    mask_ta = None if mask is None else tf.TensorArray(tf.bool, size=steps).unstack(mask)

    def body(t, h_prev, c_prev, h_ta):
        z = tf.matmul(x_ta.read(t), kernel) + tf.matmul(h_prev, recurrent_kernel)
        if bias is not None:
            z = tf.nn.bias_add(z, bias)
        _, _, _, _, c, h = _cell_step(z, c_prev)
        if mask_ta is not None:
            h, c = _keep(mask_ta.read(t)[:, None], (h, c), (h_prev, c_prev))
        if lengths is not None:
            ended = tf.greater_equal(t, lengths)  # (B,): `Select` picks whole rows
            output = tf.raw_ops.Select(condition=ended, x=tf.zeros_like(h), y=h)
            h = tf.raw_ops.Select(condition=ended, x=h_prev, y=h)
            c = tf.raw_ops.Select(condition=ended, x=c_prev, y=c)
            return t + 1, h, c, h_ta.write(t, output)
        return t + 1, h, c, h_ta.write(t, h)

    _, h_last, c_last, h_ta = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), h0, c0, h_ta)
    )
    return h_ta.stack(), h_last, c_last


def lstm_sequence_by_lengths(x, kernel, bias, recurrent_kernel, h0, c0, mask):
    """A masked recurrence as a recurrence over sequence lengths, for ONNX exports.

    Each row's kept steps are gathered to its front, in order; the loop runs
    each row for its number of kept steps (`lstm_sequence_for_inference`
    with `lengths`, which tf2onnx makes ONNX's `LSTM` op with `sequence_lens`
    of); each step's output is then gathered back from the row's latest kept
    step (`h0` before any). That is the masked recurrence for every mask:
    a masked step changes nothing. For right padding both gathers keep the
    order they find. Time-major `x` (T, B, D) and `mask` (T, B).
    Returns `(h_seq, h_last, c_last)` as `lstm_sequence_for_inference` does
    with `mask`.
    """
    steps, batch = tf.shape(x)[0], tf.shape(x)[1]
    keep = tf.transpose(mask)  # (B, T)
    t = tf.range(steps)[None, :]
    # Kept steps first, each part in step order: the keys are distinct, so
    # top_k's order is the sort's.
    _, order = tf.math.top_k(-tf.where(keep, t, t + steps), k=steps)  # (B, T)
    lengths = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
    rows = tf.range(batch)[:, None]

    def time_major_gather(sequence, step_of):
        """`sequence[step_of[b, t], b]` as (T, B, ...), one flat `Gather`."""
        flat = tf.reshape(sequence, tf.concat([[-1], tf.shape(sequence)[2:]], 0))
        return tf.gather(flat, tf.transpose(step_of * batch + rows))

    compact = time_major_gather(x, order)
    compact.set_shape(x.shape)
    h_seq, h_last, c_last = lstm_sequence_for_inference(
        compact, kernel, bias, recurrent_kernel, h0, c0, lengths=lengths
    )
    kept_so_far = tf.math.cumsum(tf.cast(keep, tf.int32), axis=1)  # (B, T)
    carried = time_major_gather(h_seq, tf.maximum(kept_so_far - 1, 0))
    h_seq = tf.where(tf.transpose(kept_so_far > 0)[:, :, None], carried, h0[None])
    return h_seq, h_last, c_last


def lstm_sequence_from_projected(xz, recurrent_kernel, h0, c0, mask=None, recurrent_mask=None):
    """Runs the recurrence over time-major `xz = x W + b` of shape (T, B, 4H).

    `mask` is an optional boolean (T, B); a `False` step keeps the row's
    previous `h` and `c`. Returns `(h_seq, c_seq)`, each (T, B, H).
    """

    @tf.custom_gradient
    def run(xz, recurrent_kernel, h0, c0):
        h_seq, c_seq, gates = _forward(
            xz, recurrent_kernel, h0, c0, mask, recurrent_mask=recurrent_mask
        )

        def grad(dh_seq, dc_seq):
            dz, dh0, dc0 = _backward(
                recurrent_kernel, c0, mask, c_seq, gates, dh_seq, dc_seq, recurrent_mask
            )
            return dz, recurrent_kernel_grad(h0, h_seq, dz, recurrent_mask), dh0, dc0

        return (h_seq, c_seq), grad

    return run(xz, recurrent_kernel, h0, c0)

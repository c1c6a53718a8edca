"""What the native and the `tf.while_loop` paths share: the XLA check and the
gradients made as single matmuls over all steps around either recurrence."""

from __future__ import annotations

import tensorflow as tf

from keras_lstm import _internals


def in_xla_context() -> bool:
    """Whether ops built now are compiled by XLA (`jit_compile=True`)."""
    graph = tf.compat.v1.get_default_graph()
    return _internals.in_xla_context(graph)


def is_zero_fill(tensor) -> bool:
    """Whether graph tensor `tensor` is zeros known when tracing (`Fill`, `Const`, `ZerosLike`).

    `tf.GradientTape` hands a gradient function zeros of the full shape for
    an output that nothing differentiates (the cell states `c` of every step,
    when the loss does not use the final `c`). Passing them on would cost a
    (T, B, H) buffer; the gradient op reads an empty tensor as zeros instead.
    """
    if tf.executing_eagerly() or not hasattr(tensor, "op"):
        return False
    kind = tensor.op.type
    if kind == "ZerosLike":
        return True
    if kind not in ("Fill", "Const"):
        return False
    value = tf.get_static_value(tensor.op.inputs[1] if kind == "Fill" else tensor)
    return value is not None and not value.any()


def matmul(a, b, bf16=False, **kwargs):
    """`tf.matmul`, with `bf16` on bfloat16 operands and a float32 result.

    TensorFlow's CPU matmul sums bfloat16 products in float32 (oneDNN, with
    AVX512-BF16 where the CPU has it). Under a `mixed_bfloat16` policy (the
    one caller that asks for it) the gradients these make reach the bfloat16
    weights and inputs through a cast to bfloat16 anyway, so a bfloat16
    result loses nothing more.
    Only outside XLA and with oneDNN on: XLA's CPU backend runs them no
    faster than float32, and without oneDNN (`TF_ENABLE_ONEDNN_OPTS=0`)
    TensorFlow's bfloat16 matmul is slower than its float32 one (the figures
    are in docs/performance.md, "Mixed precision on CPU").
    """
    if bf16 and not in_xla_context() and _internals.onednn_enabled():
        product = tf.matmul(tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16), **kwargs)
        return tf.cast(product, a.dtype)
    return tf.matmul(a, b, **kwargs)


def projection_grads(x, kernel, dz, bf16=False):
    """`(dx, dkernel)` of `z = x W` from `dz`, each one matmul over all steps."""
    flat_dz = tf.reshape(dz, (-1, dz.shape[-1]))
    dx = tf.reshape(matmul(flat_dz, kernel, bf16, transpose_b=True), tf.shape(x))
    dkernel = matmul(tf.reshape(x, (-1, x.shape[-1])), flat_dz, bf16, transpose_a=True)
    return dx, dkernel


def recurrent_kernel_grad(h0, h_seq, dz, recurrent_mask=None, bf16=False):
    """`sum_t h_{t-1}^T dz_t` as one matmul over all steps.

    With a recurrent dropout mask r (B, R), U saw `h_{t-1} * r`: that is
    what multiplies dz then.
    """
    if recurrent_mask is not None:
        h0 = h0 * recurrent_mask
        h_seq = h_seq * recurrent_mask
    units, width = tf.shape(h0)[-1], dz.shape[-1]
    if in_xla_context():
        # XLA copies a slice that feeds a matmul, and dz[1:] is G H / R times the
        # size of h (4x for a plain cell): one matmul on a copy of the shifted h
        # moves less (the figures are in docs/performance.md).
        h_prev = tf.concat([h0[None], h_seq[:-1]], axis=0)
        return matmul(
            tf.reshape(h_prev, (-1, units)), tf.reshape(dz, (-1, width)), bf16, transpose_a=True
        )
    # Two matmuls on leading-axis slices (which share their tensor's buffer)
    # instead of one on `concat([h0, h_seq[:-1]])`, which would copy every h.
    later = matmul(
        tf.reshape(h_seq[:-1], (-1, units)), tf.reshape(dz[1:], (-1, width)), bf16, transpose_a=True
    )
    if is_zero_fill(h0):  # the usual zero initial state adds nothing
        return later
    return later + matmul(h0, dz[0], bf16, transpose_a=True)


def peephole_grad(c0, c_seq, dz, cifg, c_read=None):
    """The gradient of the stacked peephole weights `[w_i, w_f, w_o]` (3, H).

    w_i and w_f multiply C_{t-1}, w_o multiplies C_t, each inside its gate's
    pre-activation, so each gradient is that gate's dz times the state it
    read, summed over steps and rows (w_i's is zero with cifg, where it is
    unused). `c_read` is the C_t the output gate read, where it differs from
    the state carried on (zoneout of C).
    """
    c_read = c_seq if c_read is None else c_read
    parts = tf.split(dz, 3 if cifg else 4, axis=-1)
    dz_f, dz_o = parts[-3], parts[-1]

    def times_previous_c(dz_gate):
        # On leading-axis slices, as recurrent_kernel_grad: no copy of every C.
        return tf.reduce_sum(dz_gate[1:] * c_seq[:-1], axis=(0, 1)) + tf.reduce_sum(
            dz_gate[0] * c0, axis=0
        )

    d_forget = times_previous_c(dz_f)
    d_output = tf.reduce_sum(dz_o * c_read, axis=(0, 1))
    d_input = tf.zeros_like(d_forget) if cifg else times_previous_c(parts[0])
    return tf.stack([d_input, d_forget, d_output])


def peephole_grad_at(c_prev, dz, cifg, c_read):
    """`peephole_grad` from the steps a mask keeps alone, each (N, ·): the C
    each step started from, its dz and the C its output gate read."""
    parts = tf.split(dz, 3 if cifg else 4, axis=-1)
    d_forget = tf.reduce_sum(parts[-3] * c_prev, axis=0)
    d_output = tf.reduce_sum(parts[-1] * c_read, axis=0)
    d_input = tf.zeros_like(d_forget) if cifg else tf.reduce_sum(parts[0] * c_prev, axis=0)
    return tf.stack([d_input, d_forget, d_output])


def projection_kernel_grad(c_seq, gates, dh_projected):
    """The gradient of the projection W_hr (H, P): `sum_t m_t^T dh_t` as one matmul.

    m_t = o_t * tanh(C_t) is what W_hr projects; o is the last H of the
    kept gate activations. `c_seq` is what tanh read: C_t, or with layer norm
    LN(C_t) γc + βc. `dh_projected` is zero where a mask kept h.
    """
    units = c_seq.shape[-1]  # H: the cell's size, always known
    m = gates[..., -units:] * tf.tanh(c_seq)
    return tf.matmul(
        tf.reshape(m, (-1, units)),
        tf.reshape(dh_projected, (-1, tf.shape(dh_projected)[-1])),
        transpose_a=True,
    )

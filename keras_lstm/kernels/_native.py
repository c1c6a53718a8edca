"""Builds, caches and loads the native (C++) LSTM sequence kernel.

The kernel (`lstm_core.cc`, the maths, and `lstm_sequence.cc`, its
TensorFlow ops) is compiled on first use with the system `g++` against the
headers of the installed TensorFlow wheel (`tf.sysconfig`); `_build` chooses
the CPU flags and `_cache` keeps the library where later processes load it in
milliseconds, checked before every load. If anything goes wrong (no
compiler, a failed build, an unsafe cache, a foreign platform) the caller
falls back to the TensorFlow-ops path after a one-line warning, and a failed
build is not tried again by later processes until `keras-lstm build`.

Environment variables:
    KERAS_LSTM_NATIVE: set to `0` to never build or use the native kernel.
    KERAS_LSTM_CACHE_DIR: where built kernels live (see `_cache`).
    CXX: the compiler (default `g++`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import tensorflow as tf

from keras_lstm.kernels import _build, _cache
from keras_lstm.kernels._gradients import (
    in_xla_context,
    is_zero_fill,
    matmul,
    peephole_grad,
    peephole_grad_at,
    projection_grads,
    projection_kernel_grad,
    recurrent_kernel_grad,
)

_HERE = Path(__file__).parent


class CellOptions(NamedTuple):
    """The cell options the native kernel computes itself (`GatedLSTMCell`'s).

    `peephole`: the weights `[w_i, w_f, w_o]` stacked, (3, H) (`w_i` zeros
    with `cifg`), or `None`; `cifg`: the input gate is `1 - f` and the kernels
    hold the gates forget, candidate, output; `cell_clip`: a positive bound
    for the cell state, or `None`; `projection`: W_hr (H, P), so that
    h = (o * tanh(c)) W_hr has P features (h0 and the recurrent kernel's rows
    then have P), or `None`; `zoneout_h` / `zoneout_c`: zoneout of h and of
    C, each a 0/1 mask a step (T, B, width) in processing order (1: keep the
    previous value), or `None`; `zoneout_h_rate` / `zoneout_c_rate`: the
    rates, used as the mixing weight where no mask is given (inference);
    `layer_norm`: layer norm's gains and shift `[γx, γh, γc, βc]` stacked,
    (2 G H + 2 H,) (βc zeros without a bias), or `None`.
    """

    peephole: object = None
    cifg: bool = False
    cell_clip: float | None = None
    projection: object = None
    zoneout_h: object = None
    zoneout_c: object = None
    zoneout_h_rate: float = 0.0
    zoneout_c_rate: float = 0.0
    layer_norm: object = None


# The op's optional tensor inputs after the first eight, in its order
# (lstm_sequence.cc; the last input, x_rows, follows them), and the
# attributes: every `CellOptions` field is one.
OPTION_TENSORS = ("peephole", "projection", "zoneout_h", "zoneout_c", "layer_norm")
OPTION_ATTRIBUTES = ("cifg", "cell_clip", "zoneout_h_rate", "zoneout_c_rate")

# The ops the library defines (lstm_sequence.cc), as its Python module names them.
OPS = (
    "keras_lstm_sequence",
    "keras_lstm_sequence_grad",
    "keras_lstm_kept_grads",
    "keras_lstm_kept_input_grad",
    "keras_lstm_row_order",
)

_state: dict = {}
_state_lock = threading.Lock()


@functools.cache
def library() -> _build.Library:
    """The main library: the maths, compiled for this CPU, and the TensorFlow ops around it."""
    return _build.Library(
        stem="lstm_sequence",
        units=(
            _build.Unit(_HERE / "lstm_core.cc", per_cpu=True),
            _build.Unit(_HERE / "lstm_sequence.cc"),
        ),
        headers=(_HERE / "lstm_core.h",),
        compile_flags=(*tf.sysconfig.get_compile_flags(), f"-I{_HERE}"),
        link_flags=tuple(tf.sysconfig.get_link_flags()),
    )


def library_name() -> str:
    """The main library's `STEM-KEY` on this machine (see `_cache`)."""
    return _cache.library_name(library(), tf.__version__)


def disabled_reason() -> str | None:
    """Why the native kernel is not even tried here, or `None`."""
    if os.environ.get("KERAS_LSTM_NATIVE", "1") == "0":
        return "KERAS_LSTM_NATIVE=0"
    if not _build.supported_platform():
        where = f"{sys.platform}/{_build.machine()}"
        return f"no native kernel for {where} (Linux on x86-64 and aarch64 only)"
    return None


def unavailable_warning(what: str, instead: str, error: Exception) -> str:
    """One line: what cannot be used and why, what runs instead, how to retry."""
    if isinstance(error, _cache.FailedBefore):
        why = f"an earlier build failed: {error.reason}"
    else:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"keras_lstm: {what} unavailable ({why}); running {instead} instead. "
        "`keras-lstm doctor` says more; `keras-lstm build` builds it again."
    )


def load(force: bool = False):
    """`(module, record)`: the op library, built first if needed; raises on any failure.

    The cache checks the library's C symbols before it is loaded; its ops are
    checked right after, so that a library without them is recorded as one
    that does not load instead of failing at the layer's first call.
    """

    def load_ops(path):
        module = tf.load_op_library(str(path))
        for op in OPS:
            if not hasattr(module, op):
                raise RuntimeError(f"{path.name} loaded but defines no op {op}")
        return module, path

    return _cache.load_or_build(library(), library_name(), load_ops, force=force)


@functools.cache  # TensorFlow takes one gradient per op name and process
def _register_gradient():
    # An order of rows has no gradient (what it orders carries its own, by `_permute`).
    tf.no_gradient("KerasLstmRowOrder")

    @tf.RegisterGradient("KerasLstmSequence")
    def _grad(op, dh_seq, dc_seq, _dgates, dh_last, dc_last, _dc_computed, _dnorms):
        module = native_module()
        (x, kernel, bias, recurrent_kernel, h0, c0, mask, recurrent_mask) = op.inputs[:8]
        peephole, projection, zoneout_h, zoneout_c, layer_norm, x_rows = op.inputs[8:]
        options = {
            name: op.get_attr(name)
            for name in ("cifg", "cell_clip", "zoneout_h_rate", "zoneout_c_rate", "bf16_products")
        }
        layout = {name: op.get_attr(name) for name in ("x_batch_major", "x_reversed")}
        bf16 = options["bf16_products"] and bf16_products() != ""
        h_seq, c_seq, gates, _, _, c_computed, norms = op.outputs
        if not op.get_attr("keep_for_gradient"):
            # Run in inference mode, which keeps nothing for the gradient:
            # run the forward pass again, keeping it.
            h_seq, c_seq, gates, _, _, c_computed, norms = module.keras_lstm_sequence(
                *op.inputs, **options, **layout
            )
        empty = tf.zeros((0,), x.dtype)
        dh_seq, dc_seq, dh_last, dc_last = (
            empty if grad is None or is_zero_fill(grad) else grad
            for grad in (dh_seq, dc_seq, dh_last, dc_last)
        )
        dz, dh0, dc0, dbias, dh_projected, d_input, d_recurrent, dlayer_norm = (
            module.keras_lstm_sequence_grad(
                recurrent_kernel,
                h0,
                c0,
                mask,
                c_seq,
                gates,
                dh_seq,
                dc_seq,
                dh_last,
                dc_last,
                recurrent_mask,
                peephole,
                projection,
                zoneout_h,
                zoneout_c,
                c_computed,
                layer_norm,
                norms,
                **options,
            )
        )
        normalised = _given(layer_norm)
        # The c the gates and h read: with zoneout of C, before it mixed in the previous one.
        zoneout_c_on = options["zoneout_c_rate"] > 0 or _given(zoneout_c)
        backward = _Backward(
            x=x,
            x_rows=x_rows if _given(x_rows) else None,
            x_batch_major=layout["x_batch_major"],
            x_reversed=layout["x_reversed"],
            kernel=kernel,
            h0=h0,
            c0=c0,
            h_seq=h_seq,
            c_seq=c_seq,
            gates=gates,
            norms=norms if normalised else None,
            c_read=c_computed if zoneout_c_on else c_seq,
            dz=dz,
            # With layer norm the weights' gradients read those of x W and h U,
            # which the norms stand between.
            d_input=d_input if normalised else dz,
            d_recurrent=d_recurrent if normalised else dz,
            dh_projected=dh_projected,
            dropped=recurrent_mask if _given(recurrent_mask) else None,
            peephole=peephole if _given(peephole) else None,
            projection=projection if _given(projection) else None,
            layer_norm=layer_norm if normalised else None,
            cifg=options["cifg"],
            bf16=bf16,
        )
        if _given(mask) and not bf16:
            dx, dkernel, drecurrent, dpeephole, dprojection = _native_kept_grads(
                module, backward, mask
            )
        else:
            # TensorFlow's matmuls read x in the kernel's row order.
            in_order = backward._replace(
                x=backward.sorted_x(), x_rows=None, x_batch_major=False, x_reversed=False
            )
            if _given(mask) and not in_xla_context():
                grads = _grads_at_kept_steps(in_order, mask)
            else:
                grads = _grads_at_all_steps(in_order)
            dx, dkernel, drecurrent, dpeephole, dprojection = grads
            dx = backward.unsorted(dx)
        dbias = dbias if _given(bias) else None
        dlayer_norm = dlayer_norm if normalised else None
        return (dx, dkernel, dbias, drecurrent, dh0, dc0, None, None, dpeephole, dprojection) + (
            None,
            None,
            dlayer_norm,
            None,
        )


class _Backward(NamedTuple):
    """What the op's gradient needs after the native backward pass: the forward
    pass's inputs and kept values, and the gradients of its pre-activations. An
    option's tensor is `None` where it is off."""

    x: Any  # as the op took it: (T, B, D), or (B, T, D) with x_batch_major
    x_rows: Any  # the row of x each of the kernel's rows reads, or None: the same row
    x_batch_major: bool
    x_reversed: bool  # the kernel's step t is x's step T - 1 - t
    kernel: Any
    h0: Any
    c0: Any
    h_seq: Any
    c_seq: Any
    gates: Any
    norms: Any  # with layer norm: x W, h U and C normalised, ...
    c_read: Any  # the C the gates and h read
    dz: Any
    d_input: Any  # the gradient of x W (of its norm's input with layer norm)
    d_recurrent: Any  # the gradient of h U (likewise)
    dh_projected: Any
    dropped: Any  # the recurrent dropout mask
    peephole: Any
    projection: Any
    layer_norm: Any  # [γx, γh, γc, βc]
    cifg: bool
    bf16: bool

    def sorted_x(self):
        """x time-major, its steps and rows in the kernel's order, as every other
        sequence here."""
        x = tf.transpose(self.x, (1, 0, 2)) if self.x_batch_major else self.x
        x = tf.reverse(x, [0]) if self.x_reversed else x
        return x if self.x_rows is None else tf.gather(x, self.x_rows, axis=1)

    def unsorted(self, dx):
        """dx (time-major, in the kernel's order) back in x's layout and order."""
        dx = dx if self.x_rows is None else tf.gather(dx, tf.argsort(self.x_rows), axis=1)
        dx = tf.reverse(dx, [0]) if self.x_reversed else dx
        return tf.transpose(dx, (1, 0, 2)) if self.x_batch_major else dx


def _grads_at_all_steps(b: _Backward, weights=True):
    """`(dx, dkernel, drecurrent, dpeephole, dprojection)` as single matmuls over all
    steps (the bias gradient the kernel summed as it went); without `weights`,
    the options' alone (the first three `None`)."""
    dx = dkernel = drecurrent = None
    if weights:
        dx, dkernel = projection_grads(b.x, b.kernel, b.d_input, bf16=b.bf16)
        drecurrent = recurrent_kernel_grad(b.h0, b.h_seq, b.d_recurrent, b.dropped, bf16=b.bf16)
    dpeephole = dprojection = None
    if b.peephole is not None:
        dpeephole = peephole_grad(b.c0, b.c_seq, b.dz, b.cifg, b.c_read)
    if b.projection is not None:
        cell_view = _cell_view(b, b.c_read, b.norms)
        dprojection = projection_kernel_grad(cell_view, b.gates, b.dh_projected)
    return dx, dkernel, drecurrent, dpeephole, dprojection


def _grads_at_kept_steps(b: _Backward, mask, weights=True):
    """The same, from the steps `mask` keeps alone: the kernel wrote the kept values
    and their gradients there only."""
    kept = _KeptSteps(mask)
    dx = dkernel = drecurrent = None
    if weights:
        dx, dkernel = projection_grads(kept.of(b.x), b.kernel, kept.of(b.d_input), bf16=b.bf16)
        dx = kept.scatter(dx, b.x)
        h_prev = kept.previous(b.h_seq, b.h0)
        if b.dropped is not None:
            h_prev = h_prev * kept.rows(b.dropped)
        drecurrent = matmul(h_prev, kept.of(b.d_recurrent), b.bf16, transpose_a=True)
    dpeephole = dprojection = None
    if b.peephole is not None:
        dpeephole = peephole_grad_at(
            kept.previous(b.c_seq, b.c0), kept.of(b.dz), b.cifg, kept.of(b.c_read)
        )
    if b.projection is not None:
        norms = None if b.norms is None else kept.of(b.norms)
        dprojection = projection_kernel_grad(
            _cell_view(b, kept.of(b.c_read), norms), kept.of(b.gates), kept.of(b.dh_projected)
        )
    return dx, dkernel, drecurrent, dpeephole, dprojection


def _native_kept_grads(module, b: _Backward, mask):
    """`_grads_at_kept_steps` with dx, dW and dU from the native ops, which
    gather the kept steps a tile at a time (lstm_core.h's KeptGrads): eagerly,
    and under XLA, whose static shapes would otherwise multiply every step.
    dx is an op of its own, which a graph that needs no dx (a layer reading
    the model's inputs) leaves out. (With bfloat16 products TensorFlow's
    matmuls make them, as it was asked.)"""
    empty = tf.zeros((0,), b.x.dtype)
    x_rows = tf.zeros((0,), tf.int32) if b.x_rows is None else b.x_rows
    layout = {"x_batch_major": b.x_batch_major, "x_reversed": b.x_reversed}
    dkernel, drecurrent = module.keras_lstm_kept_grads(
        b.x,
        b.kernel,
        b.h0,
        b.h_seq,
        mask,
        empty if b.dropped is None else b.dropped,
        b.d_input,
        empty if b.norms is None else b.d_recurrent,
        x_rows,
        **layout,
    )
    dx = module.keras_lstm_kept_input_grad(b.x, b.kernel, mask, b.d_input, x_rows, **layout)
    dpeephole = dprojection = None
    if b.peephole is not None or b.projection is not None:
        if in_xla_context():
            # Static shapes: these two read every step (zeros where a row skipped one).
            _, _, _, dpeephole, dprojection = _grads_at_all_steps(b, weights=False)
        else:
            _, _, _, dpeephole, dprojection = _grads_at_kept_steps(b, mask, weights=False)
    return dx, dkernel, drecurrent, dpeephole, dprojection


def _cell_view(b: _Backward, c_read, norms):
    """What tanh read on C's way to h: C, or with layer norm LN(C) γc + βc."""
    if b.layer_norm is None:
        return c_read
    units, width = b.c_seq.shape[-1], b.gates.shape[-1]
    at = 2 * width  # norms: x W, h U, then C normalised
    gain, shift = b.layer_norm[at : at + units], b.layer_norm[at + units :]
    return norms[..., at : at + units] * gain + shift


class _KeptSteps:
    """The steps a (T, B) mask keeps, for gradients made at those steps alone.

    The op leaves what it keeps for the gradient (and the gradient op its
    results) unwritten where a row skipped a step (lstm_core.h, "Skipped
    rows"), and every step the mask drops adds nothing to a weight gradient,
    so the gradients gather the N kept steps, (N, width), and multiply those:
    a right-padded batch pays for its real steps only.
    """

    def __init__(self, mask):
        kept = tf.where(mask > 0)  # (N, 2): step, row
        self._step, self._row = kept[:, 0], kept[:, 1]
        self._batch = tf.shape(mask, out_type=tf.int64)[1]
        self._at = self._step * self._batch + self._row

    @staticmethod
    def _flat(seq):
        width = seq.shape[-1] if seq.shape[-1] is not None else tf.shape(seq)[-1]
        return tf.reshape(seq, (-1, width))

    def of(self, seq):
        """(T, B, width) -> (N, width): the kept steps' values."""
        return tf.gather(self._flat(seq), self._at)

    def rows(self, per_row):
        """(B, width) -> (N, width): each kept step's row's values."""
        return tf.gather(per_row, self._row)

    def previous(self, seq, first):
        """(N, width): `seq` at the step before each kept step; `first` (B, width) before step 0."""
        before = tf.gather(self._flat(seq), tf.maximum(self._at - self._batch, 0))
        return tf.where((self._step > 0)[:, None], before, self.rows(first))

    def scatter(self, values, like):
        """(N, width) -> `like`'s (T, B, width), zeros at the steps the mask drops."""
        flat = self._flat(like)
        full = tf.scatter_nd(self._at[:, None], values, tf.shape(flat, out_type=tf.int64))
        return tf.reshape(full, tf.shape(like))


def _given(tensor) -> bool:
    """Whether an optional input of the ops was given: an absent one is the empty
    (0,) tensor, while a given one may have sizes unknown while tracing (a free
    batch size), so its static shape alone does not say it is empty."""
    shape = tensor.shape
    return not (shape.rank == 1 and shape[0] == 0)


def native_module():
    """The loaded op library, or `None` when it is disabled or cannot be built."""
    with _state_lock:
        if "module" not in _state:
            module = None
            # Elsewhere the TF-ops path is simply the implementation: no warning.
            if disabled_reason() is None:
                try:
                    (module, path), record = load()
                    _register_gradient()
                    _state["path"], _state["record"] = path, record
                except Exception as error:  # any failure means: use the TF-ops path
                    _state["error"] = error
                    warnings.warn(
                        unavailable_warning("native LSTM kernel", "TensorFlow ops", error),
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _state["module"] = module
        return _state["module"]


def bf16_products() -> str:
    """`"avx512_bf16"` where the loaded kernel runs products with bfloat16
    operands (lstm_core.h's `BfloatProducts`), else `""` (also without one)."""
    path = loaded_path()
    if path is None:
        return ""
    if "bf16" not in _state:
        function = ctypes.CDLL(str(path)).keras_lstm_bf16_products
        function.restype = ctypes.c_char_p
        _state["bf16"] = function().decode()
    return _state["bf16"]


def loaded_path() -> Path | None:
    """The path of the loaded main library (for the XLA library, which calls its maths)."""
    return _state.get("path") if native_module() is not None else None


def lstm_sequence(
    x,
    kernel,
    bias,
    recurrent_kernel,
    h0,
    c0,
    mask=None,
    keep_for_gradient=True,
    return_sequences=True,
    recurrent_mask=None,
    options=None,
    bf16_products=False,
    x_batch_major=False,
    x_reversed=False,
):
    """The native whole-sequence LSTM (float32, CPU); with no options, the twin of
    `_while_loop.lstm_sequence_projecting`.

    `x` is time-major (T, B, D), or with `x_batch_major` (B, T, D) as Keras's
    layers hand it over (the kernel reads it where it is, with no transpose
    first); with `x_reversed` step t reads x's step T - 1 - t (a sequence run
    backwards, without a reversed copy). Everything else, the mask and every
    output, is time-major in the order the steps run. Returns
    `(h_seq, c_seq, h_last, c_last)`: the final state comes as its own tensors
    too, so that a loss on it alone sends back no (T, B, H) gradient. Without
    `keep_for_gradient` the op keeps nothing for the backward pass (a gradient
    then runs the forward pass again) and `c_seq` is empty; `h_seq` is empty
    unless `return_sequences` or `keep_for_gradient`. `recurrent_mask` (B, H),
    if given, multiplies `h_{t-1}` before the recurrent product (recurrent
    dropout, one mask per sequence). `options` (a `CellOptions`), if given,
    turns on the cell options the kernel computes.
    `bf16_products` gives the steps' products (and the weight gradients)
    bfloat16 operands where the CPU has the instructions (`bf16_products()`).
    """
    module = native_module()
    options = options or CellOptions()
    bias = tf.zeros((0,), tf.float32) if bias is None else bias
    empty = tf.zeros((0,), tf.float32)
    x_rows = tf.zeros((0,), tf.int32)
    if mask is None:
        mask = empty
    else:
        # Rows in order of their number of kept steps (see `_row_order`), so
        # that the kernel's trimming follows a right-padded batch's lengths.
        # x itself stays in its order: the kernel reads each row's through `x_rows`.
        order, inverse, mask = _row_order(mask)
        x_rows = order
        h0, c0 = (_permute(t, order, inverse, 0) for t in (h0, c0))
        if recurrent_mask is not None:
            recurrent_mask = tf.gather(recurrent_mask, order)
        options = options._replace(
            zoneout_h=None
            if options.zoneout_h is None
            else tf.gather(options.zoneout_h, order, axis=1),
            zoneout_c=None
            if options.zoneout_c is None
            else tf.gather(options.zoneout_c, order, axis=1),
        )
    h_seq, c_seq, _, h_last, c_last, _, _ = module.keras_lstm_sequence(
        x,
        kernel,
        bias,
        recurrent_kernel,
        h0,
        c0,
        mask,
        empty if recurrent_mask is None else recurrent_mask,
        *(_or_empty(getattr(options, name), empty) for name in OPTION_TENSORS),
        x_rows,
        keep_for_gradient=keep_for_gradient,
        return_sequences=return_sequences,
        cifg=options.cifg,
        cell_clip=options.cell_clip or 0.0,
        zoneout_h_rate=options.zoneout_h_rate,
        zoneout_c_rate=options.zoneout_c_rate,
        bf16_products=bool(bf16_products),
        x_batch_major=bool(x_batch_major),
        x_reversed=bool(x_reversed),
    )
    if mask is not empty:
        # Back to the caller's order (an output not kept stays empty).
        if keep_for_gradient or return_sequences:
            h_seq = _permute(h_seq, inverse, order, 1)
        if keep_for_gradient:
            c_seq = _permute(c_seq, inverse, order, 1)
        h_last, c_last = _permute(h_last, inverse, order, 0), _permute(c_last, inverse, order, 0)
    return h_seq, c_seq, h_last, c_last


def _or_empty(tensor, empty):
    """The op's inputs are never optional: an absent one is the empty tensor."""
    return empty if tensor is None else tensor


def _row_order(mask):
    """`(order, inverse, sorted_mask)`: the batch's rows for the kernel, the
    way back, and the mask (T, B) in the kernel's order, float32.

    The kernel splits the batch into contiguous blocks, one a thread
    (lstm_sequence.cc's ForEachChunk), and runs each block's rows longest
    first, so that for a right-padded mask (and for its mirror, which
    `go_backwards` turns into a suffix) the rows that run a step are a prefix
    of the block at every step, and the kernel stops each step's work at the
    last of them (lstm_core.h, "Skipped rows"). Which rows share a block is
    chosen so that the slowest block finishes early (lstm_core.h's
    OrderRows). Any order gives the same results; this one only decides the
    cost. `mask` is (T, B), of any dtype (nonzero: kept).
    """
    return native_module().keras_lstm_row_order(tf.cast(mask, tf.bool))


def _permute(tensor, order, inverse, axis):
    """`tf.gather(tensor, order, axis=axis)`, whose gradient is the gather
    back by `inverse` (a dense one, where tf.gather's would be sparse)."""

    @tf.custom_gradient
    def permute(tensor):
        def grad(upstream):
            return tf.gather(upstream, inverse, axis=axis)

        return tf.gather(tensor, order, axis=axis), grad

    return permute(tensor)

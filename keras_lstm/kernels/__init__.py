"""Fused whole-sequence LSTM routes for the TensorFlow backend.

`lstm_recurrence(route, sequence)` runs a standard LSTM (Keras gate order i,
f, c, o; sigmoid gates; tanh candidate and output), or with the cell options
the native kernel computes, over a whole batch of sequences as one
differentiable op, and returns exactly what `keras.backend.rnn` returns. Which
route runs is decided by `keras_lstm._routes`; here each route is one small
unit taking the time-major `Steps` and returning `(h_seq, h_last, c_last)`:

- `native` / `native_xla`: the native C++ kernel (`lstm_sequence.cc`, maths
  in `lstm_core.h`), built on first use, for CPU: one matmul per step (input
  projection included) and one fused pointwise pass, the batch split across
  threads. Mixed-precision inputs run in float32 (cast in and out), with
  bfloat16 products under bfloat16 where the CPU has AVX512-BF16
  (`bf16_products`). Under XLA (`jit_compile=True`) the same op runs as a
  custom call from a second library (`lstm_sequence_xla.cc`, see `_native_xla`);
- `loop` / `loop_xla`: TensorFlow ops in two `tf.while_loop`s with a custom
  gradient (on GPU, float64, where the native kernel cannot be built); under
  XLA each step projects its own input, which XLA's CPU backend runs faster;
- `export_loop`, `export_lengths`, `no_tensor_lists`, `tflite_fused`: forward loops in the forms
  the exports' converters take (see `_while_loop`).

The weight and input gradients are large matmuls over all steps at once. This
package depends on nothing else in `keras_lstm` but `_internals` (TensorFlow's
private names it uses).

Public names: `native_available` (is the native kernel in use here?),
`build_native` (build it now, e.g. when making a Docker image) and
`bf16_products`; `keras-lstm doctor` and `keras-lstm build` are their
command-line faces.
"""

from __future__ import annotations

import concurrent.futures
import warnings
from typing import Any, NamedTuple

import tensorflow as tf

from keras_lstm.kernels import _cache, _native, _native_xla, _while_loop
from keras_lstm.kernels._gradients import in_xla_context

CellOptions = _native.CellOptions

__all__ = [
    "CellOptions",
    "Sequence",
    "bf16_products",
    "build_native",
    "in_xla_context",
    "lstm_recurrence",
    "mask_uniform",
    "native_available",
]


def native_available(jit_compile: bool = False) -> bool:
    """Whether the fused LSTM op runs the native kernel in this process.

    Builds the kernel on the first call of a process if it is not in the
    cache yet (it says so on stderr; the XLA library too with
    `jit_compile=True`), as the first `GatedLSTM` call would. `False` where it
    is switched off (`KERAS_LSTM_NATIVE=0`), on a platform other than Linux on
    x86-64 or aarch64, or where the build failed (after one warning).

    Args:
        jit_compile: Ask about XLA (`jit_compile=True`) instead: whether the
            native kernel runs there as a custom call.

    Example:

    >>> from keras_lstm.kernels import native_available
    >>> native_available() in (True, False)
    True
    """
    if _native.native_module() is None:
        return False
    return not jit_compile or _native_xla.xla_library() is not None


def build_native(force: bool = False, jit_compile: bool = True) -> dict:
    """Builds the native kernel now (and its XLA library), and loads it.

    For an image or a cluster node that should not compile on first use:
    run it (or `keras-lstm build`) once at build time with the same
    `KERAS_LSTM_CACHE_DIR` the jobs will use. The two libraries compile at the
    same time. A library already built and intact is kept unless `force`; a
    build that failed before is tried again.

    Args:
        force: Rebuild even a library that is already built.
        jit_compile: Build the XLA library too.

    Returns:
        `{"native": record, "xla": record}`: how each library was built (its
        path, compiler, CPU flags, seconds), as kept in the cache.

    Raises:
        RuntimeError: One line a library that could not be built or loaded,
            with the reason.

    Example:

    >>> from keras_lstm.kernels import build_native
    >>> native = build_native()["native"]  # doctest: +SKIP
    >>> native["flag_set"], native["cpu_flags"]  # doctest: +SKIP
    ('native', ['-march=native', '-mno-avx512fp16'])
    """
    reason = _native.disabled_reason()
    if reason is not None:
        raise RuntimeError(f"the native kernel is not built here: {reason}")
    wanted = {"native": (_native.library(), _native.library_name())}
    if jit_compile:
        wanted["xla"] = (_native_xla.library(), _native_xla.library_name())
    errors = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        futures = {
            key: pool.submit(_build_unless_built, library, name, force)
            for key, (library, name) in wanted.items()
        }
        for key, future in futures.items():
            try:
                future.result()
            except Exception as error:
                errors[key] = error
    # Load what was built, as the layer will; an explicit build forgets this
    # process's earlier failures, and says its own instead of warning.
    _native._state.clear()
    _native_xla._state.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if "native" not in errors and _native.native_module() is None:
            errors["native"] = _native._state["error"]
        if (
            "xla" in wanted
            and "xla" not in errors
            and "native" not in errors
            and (_native_xla.xla_library() is None)
        ):
            errors["xla"] = _native_xla._state["error"]
    if errors:
        lines = (f"{key} library: {str(error).splitlines()[0]}" for key, error in errors.items())
        raise RuntimeError("; ".join(lines))
    records = {"native": _native._state["record"]}
    if "xla" in wanted:
        records["xla"] = _native_xla._state["record"]
    return records


def _build_unless_built(library, name, force):
    """Builds `library` unless built and intact (or `force`); a recorded failure is retried."""
    try:
        return _cache.load_or_build(library, name, force=force)
    except _cache.FailedBefore:
        return _cache.load_or_build(library, name, force=True)


def bf16_products() -> str:
    """The instructions the native kernel runs bfloat16 products with here:
    `"avx512_bf16"` (vdpbf16ps: bfloat16 pairs summed in float32), or `""`
    where the CPU has none (or no native kernel runs) and products stay float32.

    Under a `mixed_bfloat16` policy the fused layer uses them for each step's
    products and its weight gradients; the cell state, the gates and every
    sum stay float32. `keras-lstm doctor` prints the same.

    Example:

    >>> from keras_lstm import kernels
    >>> kernels.bf16_products() in ("avx512_bf16", "")
    True
    """
    return _native.bf16_products()


def mask_uniform(shape, seed_generator, dtype=tf.float32):
    """Uniform numbers in [0, 1) for random masks, from a Keras `SeedGenerator`.

    `keras.random.uniform` draws them too, with TensorFlow's default
    generator, which XLA's CPU backend runs far slower than ThreeFry (the
    figures are in docs/performance.md). So under XLA this draws with
    ThreeFry; elsewhere with the default. Same distribution, seeded from the
    same generator, not the same numbers.
    """
    seed = tf.convert_to_tensor(seed_generator.next())
    if seed.dtype != tf.int32:
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    alg = "threefry" if in_xla_context() else "auto_select"
    return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype, alg=alg)


class Sequence(NamedTuple):
    """One recurrence as Keras's layer hands it over: batch-major `inputs` (B, T, D),
    `mask` (B, T) or `None`, the weights, and `h0`, `c0` (B, H).

    `recurrent_mask` (B, H), if given, multiplies `h_{t-1}` before the
    recurrent product at every step (recurrent dropout as Keras draws it: one
    mask per sequence, scaled). `options` (a `CellOptions`) turns on the cell
    options only the native kernel computes. With `training=False` the native
    kernel keeps nothing for the backward pass (a gradient, if asked for
    anyway, runs the forward pass again). `bf16_products` asks for bfloat16
    operands in the native kernel's products with float32 inputs too (they
    have them under bfloat16 anyway, where the CPU can).
    """

    inputs: Any
    kernel: Any
    recurrent_kernel: Any
    bias: Any
    h0: Any
    c0: Any
    mask: Any = None
    recurrent_mask: Any = None
    options: CellOptions | None = None
    training: Any = True
    return_sequences: bool = True
    bf16_products: bool = False


class Steps(NamedTuple):
    """A `Sequence` as every route unit takes it: time-major `x` (T, B, D) and
    boolean `mask` (T, B) in processing order, weights in `x`'s dtype.

    For the native routes, whose kernel reads x where it is, `x` stays as the
    layer handed it over: `x_batch_major`, (B, T, D), and `x_reversed` where the
    steps run backwards (step t is x's step T - 1 - t); the mask is time-major
    in processing order all the same.
    """

    x: Any
    kernel: Any
    recurrent_kernel: Any
    bias: Any
    h0: Any
    c0: Any
    mask: Any
    recurrent_mask: Any
    options: CellOptions | None
    keep_for_gradient: bool
    return_sequences: bool
    bf16_products: bool
    x_batch_major: bool = False
    x_reversed: bool = False

    @property
    def steps_and_batch(self):
        """x's (T, B), static where known."""
        time, batch = self.x.shape[:2]
        return (batch, time) if self.x_batch_major else (time, batch)


# The routes whose kernel reads x where it is (`Steps`).
_READ_IN_PLACE = ("native", "native_xla")


def lstm_recurrence(route: str, sequence: Sequence, go_backwards=False, zero_output_for_mask=False):
    """Runs `sequence` through the fused `route` (a `_routes.Route` value).

    Returns `(last_output, outputs, [h, c])` as `keras.backend.rnn` does:
    `outputs` is (B, T, H) (in processing order when `go_backwards`) or
    (B, 1, H) without `return_sequences`; a masked step keeps the previous
    state and outputs the previous output (zeros before any unmasked step,
    or zeros always with `zero_output_for_mask`).
    """
    if route not in ROUTES:
        raise ValueError(f"`route` must be one of {sorted(ROUTES)}, got {route!r}.")
    if sequence.options is not None and route not in ("native", "native_xla"):
        raise ValueError(
            f"cell options run fused only in the native kernel, not on the {route!r} route; "
            "Keras's step loop around the cell computes them elsewhere."
        )
    steps = _as_steps(sequence, go_backwards, in_place=route in _READ_IN_PLACE)
    h_seq, h_last, c_last = ROUTES[route](steps)
    return _keras_returns(steps, h_seq, h_last, c_last, zero_output_for_mask)


def _as_steps(sequence: Sequence, go_backwards: bool, in_place: bool = False) -> Steps:
    """`sequence` as `Steps`: x time-major in processing order, or with
    `in_place` as the layer handed it over (see `Steps`)."""
    dtype = sequence.inputs.dtype
    x = sequence.inputs
    if not in_place:
        x = tf.transpose(x, (1, 0, 2))
        x = tf.reverse(x, [0]) if go_backwards else x
    mask = sequence.mask
    if mask is not None:
        mask = tf.transpose(tf.cast(mask, tf.bool), (1, 0))
        mask = tf.reverse(mask, [0]) if go_backwards else mask
    training = sequence.training
    return Steps(
        x,
        sequence.kernel,
        sequence.recurrent_kernel,
        sequence.bias,
        sequence.h0,
        sequence.c0,
        mask,
        sequence.recurrent_mask,
        sequence.options,
        keep_for_gradient=bool(training) if isinstance(training, bool) else True,
        return_sequences=sequence.return_sequences,
        bf16_products=sequence.bf16_products or dtype == tf.bfloat16,
        x_batch_major=in_place,
        x_reversed=in_place and go_backwards,
    )


def _cast(steps: Steps, dtype) -> Steps:
    """`steps` with every tensor (the options' too) in `dtype`; `None` stays. Each
    unit casts what it takes (weights arrive as the variables give them)."""

    def cast(t):
        return None if t is None else tf.cast(t, dtype)

    options = steps.options
    if options is not None:
        options = options._replace(
            **{field: cast(getattr(options, field)) for field in _native.OPTION_TENSORS}
        )
    return steps._replace(
        x=cast(steps.x),
        kernel=cast(steps.kernel),
        recurrent_kernel=cast(steps.recurrent_kernel),
        bias=cast(steps.bias),
        h0=cast(steps.h0),
        c0=cast(steps.c0),
        recurrent_mask=cast(steps.recurrent_mask),
        options=options,
    )


def _run_native(steps: Steps):
    """The native kernel, in float32: a mixed policy's inputs are cast in and out."""
    dtype = steps.x.dtype
    steps = _cast(steps, tf.float32)
    h_seq, _, h_last, c_last = _native.lstm_sequence(
        steps.x,
        steps.kernel,
        steps.bias,
        steps.recurrent_kernel,
        steps.h0,
        steps.c0,
        steps.mask,
        keep_for_gradient=steps.keep_for_gradient,
        return_sequences=steps.return_sequences,
        recurrent_mask=steps.recurrent_mask,
        options=steps.options,
        bf16_products=steps.bf16_products,
        x_batch_major=steps.x_batch_major,
        x_reversed=steps.x_reversed,
    )
    return tuple(tf.cast(t, dtype) for t in (h_seq, h_last, c_last))


def _run_native_xla(steps: Steps):
    """The native kernel under XLA: its custom call needs the XLA library loaded."""
    if _native_xla.xla_library() is None:
        error = _native_xla._state.get("error")
        raise RuntimeError(f"the native kernel's XLA library is unavailable here: {error}")
    return _run_native(steps)


def _projected(steps: Steps):
    """`x W + b` of every step in one matmul, time-major (T, B, G H)."""
    x, kernel = steps.x, steps.kernel
    xz = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), kernel)
    if steps.bias is not None:
        xz = xz + steps.bias
    return tf.reshape(xz, (tf.shape(x)[0], tf.shape(x)[1], kernel.shape[-1]))


def _run_loop(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    h_seq, c_seq = _while_loop.lstm_sequence_from_projected(
        _projected(steps),
        steps.recurrent_kernel,
        steps.h0,
        steps.c0,
        steps.mask,
        steps.recurrent_mask,
    )
    return h_seq, h_seq[-1], c_seq[-1]


def _run_loop_xla(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    h_seq, c_seq = _while_loop.lstm_sequence_projecting(
        steps.x,
        steps.kernel,
        steps.bias,
        steps.recurrent_kernel,
        steps.h0,
        steps.c0,
        steps.mask,
        steps.recurrent_mask,
    )
    return h_seq, h_seq[-1], c_seq[-1]


def _run_export_loop(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    return _while_loop.lstm_sequence_for_inference(
        steps.x, steps.kernel, steps.bias, steps.recurrent_kernel, steps.h0, steps.c0, steps.mask
    )


def _run_export_lengths(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    return _while_loop.lstm_sequence_by_lengths(
        steps.x, steps.kernel, steps.bias, steps.recurrent_kernel, steps.h0, steps.c0, steps.mask
    )


def _run_without_lists(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    return _while_loop.lstm_sequence_without_lists(
        _projected(steps), steps.recurrent_kernel, steps.h0, steps.c0, steps.mask
    )


def _run_tflite_fused(steps: Steps):
    steps = _cast(steps, steps.x.dtype)
    return _while_loop.lstm_sequence_for_tflite_fusion(
        steps.x, steps.kernel, steps.bias, steps.recurrent_kernel, steps.h0, steps.c0
    )


# The fused routes, by `_routes.Route` value.
ROUTES = {
    "native": _run_native,
    "native_xla": _run_native_xla,
    "loop": _run_loop,
    "loop_xla": _run_loop_xla,
    "export_loop": _run_export_loop,
    "export_lengths": _run_export_lengths,
    "no_tensor_lists": _run_without_lists,
    "tflite_fused": _run_tflite_fused,
}


def _keras_returns(steps: Steps, h_seq, h_last, c_last, zero_output_for_mask):
    """`(last_output, outputs, [h, c])` as `keras.backend.rnn` returns them."""
    mask = steps.mask
    if steps.return_sequences:
        # The loops lose the static number of steps; later layers (an
        # unrolled one, say) need it.
        h_seq.set_shape(tf.TensorShape(steps.steps_and_batch).concatenate(steps.h0.shape[-1:]))
    outputs, last_output = h_seq, h_last
    if mask is not None:
        # The output carried through masked steps starts at zero, not h0: the
        # last output is zero for a row no step kept (or, with
        # zero_output_for_mask, whose last step is masked).
        shown_last = mask[-1] if zero_output_for_mask else tf.reduce_any(mask, axis=0)
        last_output = tf.where(shown_last[:, None], h_last, tf.zeros_like(h_last))
        if steps.return_sequences:
            if zero_output_for_mask:
                shown = mask
            else:
                shown = tf.cast(tf.math.cumsum(tf.cast(mask, tf.int32), axis=0), tf.bool)
            outputs = tf.where(shown[:, :, None], h_seq, tf.zeros_like(h_seq))
    if steps.return_sequences:
        outputs = tf.transpose(outputs, (1, 0, 2))
    else:
        outputs = last_output[:, None, :]
    return last_output, outputs, [h_last, c_last]

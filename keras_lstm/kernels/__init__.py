"""Fused whole-sequence LSTM ops for the TensorFlow backend.

`lstm_recurrence` runs a standard LSTM (Keras gate order i, f, c, o; sigmoid
gates; tanh candidate and output) over a whole batch of sequences as one
differentiable op and returns exactly what `keras.backend.rnn` returns. It
picks one of two implementations of the same maths:

- a native C++ kernel (`lstm_sequence.cc`, maths in `lstm_core.h`), built on
  first use, for float32 on CPU: one matmul per step (input projection
  included) and one fused pointwise pass, the batch split across threads.
  Under a mixed-precision policy (float16 or bfloat16 compute) on CPU it runs
  in float32 too, its inputs and results cast; under bfloat16, its products
  take bfloat16 operands where the CPU has AVX512-BF16 (`bf16_products`).
  Under XLA (`jit_compile=True`) the same op runs as a custom call from a
  second library (`lstm_sequence_xla.cc`, see `_native_xla`);
- TensorFlow ops in two `tf.while_loop`s with a custom gradient, everywhere
  else (on GPU, float64, in exports, or when a native library cannot be
  built).

The weight and input gradients are large matmuls over all steps at once. The
TF-ops path projects the inputs `x W + b` of all steps in one matmul too,
except under XLA, whose CPU backend runs the loop faster when each step
projects its own input (as the native kernel does). This package depends on nothing else in
`keras_lstm` but `_internals` (TensorFlow's private names it uses).

Public names: `native_available` (is the native kernel in use here?) and
`build_native` (build it now, e.g. when making a Docker image); `keras-lstm
doctor` and `keras-lstm build` are their command-line faces.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import warnings

import tensorflow as tf

from keras_lstm import _internals
from keras_lstm.kernels import _cache, _native, _native_xla, _while_loop
from keras_lstm.kernels._gradients import in_xla_context

_local = threading.local()

CellOptions = _native.CellOptions
# The `GatedLSTMCell` options the native kernel computes itself (`CellOptions`);
# a cell with any other option runs Keras's step loop.
NATIVE_CELL_OPTIONS = (
    "peephole",
    "cifg",
    "cell_clip",
    "proj_units",
    "zoneout_h",
    "zoneout_c",
    "layer_norm",
)

__all__ = [
    "bf16_products",
    "build_native",
    "export_loop_form",
    "lstm_recurrence",
    "native_available",
    "portable_ops",
]


def native_available(jit_compile: bool = False) -> bool:
    """Whether the fused LSTM op runs the native kernel in this process.

    Builds the kernel on the first call of a process if it is not in the
    cache yet (about 25 s; 40 s more for the XLA library with
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


# The loop forms `portable_ops` can ask for.
LOOP_FORMS = ("inference", "onnx", "no_tensor_lists", "tflite_fused")


@contextlib.contextmanager
def portable_ops(form: str = "inference"):
    """Within this block the fused op is built from TensorFlow's own ops only.

    Graphs traced here (a SavedModel for TensorFlow Serving, a TFLite or ONNX
    model) then run where the native kernel's library is not loaded. Tracing
    inside `tf.saved_model.save` is portable without it. `form` picks the loop:

    - `"inference"`: one lean `tf.while_loop`, in the form tf2onnx fuses into
      ONNX's `LSTM` op (`_while_loop.lstm_sequence_for_inference`);
    - `"onnx"`: the same loop, for an ONNX export (a masked layer then says
      that it stays an ONNX `Loop`);
    - `"no_tensor_lists"`: no `tf.TensorArray`, for converters that cannot
      take TensorList ops at a free batch size (TFLite's, OpenVINO's); see
      `_while_loop.lstm_sequence_without_lists`;
    - `"tflite_fused"`: the composite function TFLite's converter turns into
      `UNIDIRECTIONAL_SEQUENCE_LSTM` (`_while_loop.lstm_sequence_for_tflite_fusion`)
      where the batch size is fixed and there is no mask, else as
      `"no_tensor_lists"`.
    """
    if form not in LOOP_FORMS:
        raise ValueError(f"`form` must be one of {LOOP_FORMS}, got {form!r}.")
    previous = getattr(_local, "portable", False), getattr(_local, "form", "inference")
    _local.portable, _local.form = True, form
    try:
        yield
    finally:
        _local.portable, _local.form = previous


def _exporting() -> bool:
    """Whether the graph traced now is for an export (SavedModel, TFLite, ONNX)."""
    return getattr(_local, "portable", False) or _internals.in_save_context()


def export_loop_form() -> str:
    """The loop form of the export traced now (`portable_ops`, or `tf.saved_model.save`),
    or `""` when the graph is not for an export."""
    if getattr(_local, "portable", False):
        return getattr(_local, "form", "inference")
    return "inference" if _internals.in_save_context() else ""


# Dtypes the native kernel takes: float32 itself, and the mixed-precision
# compute dtypes, which it runs in float32 (cast in, cast out).
_NATIVE_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def _use_native(dtype) -> bool:
    if _exporting():
        return False
    if dtype not in _NATIVE_DTYPES or tf.config.list_logical_devices("GPU"):
        return False
    if _native.native_module() is None:
        return False
    # Under XLA the op runs as a custom call of its own library (CPU only).
    return not in_xla_context() or _native_xla.xla_library() is not None


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


def cell_options_fuse_here(dtype) -> bool:
    """Whether `lstm_recurrence` takes `options` in the graph traced now: the
    native kernel runs (float32 on CPU, not in an export; under XLA only with
    its library)."""
    return _use_native(tf.as_dtype(dtype))


def mask_uniform(shape, seed_generator, dtype=tf.float32):
    """Uniform numbers in [0, 1) for random masks, from a Keras `SeedGenerator`.

    `keras.random.uniform` draws them too, with TensorFlow's default
    generator, which XLA's CPU backend runs about 100x slower than ThreeFry
    (180 ms against 1.3 ms for the 819,200 numbers of zoneout's masks at
    T=100, B=64, H=128, measured here). So under XLA this draws with
    ThreeFry; elsewhere with the default. Same distribution, seeded from the
    same generator, not the same numbers.
    """
    seed = tf.convert_to_tensor(seed_generator.next())
    if seed.dtype != tf.int32:
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    alg = "threefry" if in_xla_context() else "auto_select"
    return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype, alg=alg)


def lstm_recurrence(
    inputs,
    kernel,
    recurrent_kernel,
    bias,
    h0,
    c0,
    mask=None,
    go_backwards=False,
    return_sequences=True,
    zero_output_for_mask=False,
    training=True,
    recurrent_mask=None,
    options=None,
    bf16_products=False,
):
    """Runs an LSTM over batch-major `inputs` (B, T, D), Keras-compatible.

    Returns `(last_output, outputs, [h, c])` as `keras.backend.rnn` does:
    `outputs` is (B, T, H) (in processing order when `go_backwards`) or
    (B, 1, H) without `return_sequences`; a masked step keeps the previous
    state and outputs the previous output (zeros before any unmasked step,
    or zeros always with `zero_output_for_mask`). With `training=False` the
    native kernel keeps nothing for the backward pass (a gradient, if one is
    asked for anyway, runs the forward pass again). `recurrent_mask` (B, H),
    if given, multiplies `h_{t-1}` before the recurrent product at every step
    (recurrent dropout as Keras draws it: one mask per sequence, scaled);
    exports, which never train, take none. `options` (a `CellOptions`) turns
    on peephole, cifg, cell clip, projection, zoneout and layer norm; only the
    native kernel computes them, so they may be given only where
    `cell_options_fuse_here` says so. With bfloat16 inputs (a `mixed_bfloat16`
    policy) the native kernel runs in float32 with bfloat16 operands for its
    products where the CPU has the instructions (`bf16_products()`);
    `bf16_products` asks for that with float32 inputs too.
    """
    dtype = inputs.dtype
    if options is not None and not _use_native(dtype):
        raise ValueError(
            "cell options (peephole, cifg, cell_clip, proj_units, zoneout, layer_norm) run fused "
            "only in the "
            "native kernel, which does not run here; use Keras's step loop around the cell "
            "instead."
        )
    if dtype != tf.float32 and _use_native(dtype):
        # Mixed precision on CPU: the float32 kernel, its results cast back.
        def f32(t):
            return None if t is None else tf.cast(t, tf.float32)

        last_output, outputs, states = lstm_recurrence(
            f32(inputs),
            f32(kernel),
            f32(recurrent_kernel),
            f32(bias),
            f32(h0),
            f32(c0),
            mask=mask,
            go_backwards=go_backwards,
            return_sequences=return_sequences,
            zero_output_for_mask=zero_output_for_mask,
            training=training,
            recurrent_mask=f32(recurrent_mask),
            bf16_products=bf16_products or dtype == tf.bfloat16,
            options=None
            if options is None
            else options._replace(
                peephole=f32(options.peephole),
                projection=f32(options.projection),
                zoneout_h=f32(options.zoneout_h),
                zoneout_c=f32(options.zoneout_c),
                layer_norm=f32(options.layer_norm),
            ),
        )
        return (
            tf.cast(last_output, dtype),
            tf.cast(outputs, dtype),
            [tf.cast(state, dtype) for state in states],
        )
    if options is not None:

        def cast(t):
            return None if t is None else tf.cast(t, dtype)

        options = options._replace(
            peephole=cast(options.peephole),
            projection=cast(options.projection),
            zoneout_h=cast(options.zoneout_h),
            zoneout_c=cast(options.zoneout_c),
            layer_norm=cast(options.layer_norm),
        )
    kernel = tf.cast(kernel, dtype)
    if recurrent_mask is not None:
        recurrent_mask = tf.cast(recurrent_mask, dtype)
    recurrent_kernel = tf.cast(recurrent_kernel, dtype)
    x = tf.transpose(inputs, (1, 0, 2))
    if mask is not None:
        mask = tf.transpose(tf.cast(mask, tf.bool), (1, 0))
    if go_backwards:
        x = tf.reverse(x, [0])
        mask = None if mask is None else tf.reverse(mask, [0])

    bias = None if bias is None else tf.cast(bias, dtype)
    if _use_native(dtype):
        h_seq, c_seq, h_last, c_last = _native.lstm_sequence(
            x,
            kernel,
            bias,
            recurrent_kernel,
            h0,
            c0,
            mask,
            keep_for_gradient=bool(training) if isinstance(training, bool) else True,
            return_sequences=return_sequences,
            recurrent_mask=recurrent_mask,
            options=options,
            bf16_products=bf16_products,
        )
    elif export_loop_form() in ("inference", "onnx"):
        h_seq, h_last, c_last = _while_loop.lstm_sequence_for_inference(
            x, kernel, bias, recurrent_kernel, h0, c0, mask
        )
    elif (
        export_loop_form() == "tflite_fused"
        and mask is None
        and h0.shape.is_fully_defined()
        and c0.shape.is_fully_defined()
    ):
        h_seq, h_last, c_last = _while_loop.lstm_sequence_for_tflite_fusion(
            x, kernel, bias, recurrent_kernel, h0, c0
        )
    elif in_xla_context():
        h_seq, c_seq = _while_loop.lstm_sequence_projecting(
            x, kernel, bias, recurrent_kernel, h0, c0, mask, recurrent_mask
        )
        h_last, c_last = h_seq[-1], c_seq[-1]
    else:
        # The input projection of every step in one matmul.
        steps, batch = tf.shape(x)[0], tf.shape(x)[1]
        xz = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), kernel)
        if bias is not None:
            xz = xz + bias
        xz = tf.reshape(xz, (steps, batch, kernel.shape[-1]))
        if export_loop_form() in ("no_tensor_lists", "tflite_fused"):
            h_seq, h_last, c_last = _while_loop.lstm_sequence_without_lists(
                xz, recurrent_kernel, h0, c0, mask
            )
        else:
            h_seq, c_seq = _while_loop.lstm_sequence(
                xz, recurrent_kernel, h0, c0, mask, recurrent_mask
            )
            h_last, c_last = h_seq[-1], c_seq[-1]
    states = [h_last, c_last]
    if return_sequences:
        # The loops lose the static number of steps; later layers (an
        # unrolled one, say) need it.
        h_seq.set_shape(x.shape[:2].concatenate(h0.shape[-1:]))

    outputs = h_seq
    last_output = h_last
    if mask is not None:
        if zero_output_for_mask:
            shown = mask
        else:
            # The output carried through masked steps starts at zero, not h0.
            shown = tf.cast(tf.math.cumsum(tf.cast(mask, tf.int32), axis=0), tf.bool)
        last_output = tf.where(shown[-1][:, None], h_last, tf.zeros_like(h_last))
        if return_sequences:
            outputs = tf.where(shown[:, :, None], h_seq, tf.zeros_like(h_seq))
    if return_sequences:
        outputs = tf.transpose(outputs, (1, 0, 2))
    else:
        outputs = last_output[:, None, :]
    return last_output, outputs, states

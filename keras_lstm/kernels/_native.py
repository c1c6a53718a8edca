"""Builds, caches and loads the native (C++) LSTM sequence kernel.

The kernel is compiled on first use with the system `g++` against the headers
of the installed TensorFlow wheel (`tf.sysconfig`), into a cache directory
keyed by the source, the TensorFlow version and the CPU, so a later process
loads it in milliseconds. A lock file keeps two processes from building at
once. If anything goes wrong (no compiler, a failed build, a foreign
platform) the caller falls back to the TensorFlow-ops path after a one-line
warning.

Environment variables:
    KERAS_LSTM_NATIVE: set to `0` to never build or use the native kernel.
    KERAS_LSTM_CACHE_DIR: where built kernels live. Default:
        `$XDG_CACHE_HOME/keras_lstm` or `~/.cache/keras_lstm`, else a
        `_build` directory next to this file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import tensorflow as tf

_SOURCE = Path(__file__).with_name("lstm_sequence.cc")
_HEADERS = (Path(__file__).with_name("lstm_core.h"),)
_FLAGS = ("-shared", "-fPIC", "-O3", "-march=native", "-w")
_state: dict = {}
_state_lock = threading.Lock()


def _cpu_identity() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            # x86 names its CPU and flags; aarch64 its implementer, part and features.
            if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                yield line
    yield platform.machine()


def _cache_dirs():
    if os.environ.get("KERAS_LSTM_CACHE_DIR"):
        yield Path(os.environ["KERAS_LSTM_CACHE_DIR"])
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    yield Path(base) / "keras_lstm"
    yield Path(__file__).with_name("_build")


def _library_name() -> str:
    digest = hashlib.sha256()
    for source in (_SOURCE, *_HEADERS):
        digest.update(source.read_bytes())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_FLAGS + tuple(tf.sysconfig.get_compile_flags())).encode())
    digest.update("\n".join(_cpu_identity()).encode())
    return f"lstm_sequence_{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compile_library(target: Path, source: Path, compile_flags, link_flags) -> None:
    """Compiles `source` into the shared library `target`, atomically."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, *_FLAGS, *compile_flags, str(source), "-o", tmp, *link_flags]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: other processes see all or nothing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_cached(name: str, build, load):
    """`load(path)` of library `name` from the first usable cache directory.

    The library is built there first with `build(path)` if missing, behind a
    lock file so that two processes do not build it at once.
    """
    errors = []
    for directory in _cache_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / name
            if not target.exists():
                with _file_lock(directory / (name + ".lock")):
                    if not target.exists():
                        build(target)
            return load(target)
        except (OSError, RuntimeError, subprocess.SubprocessError, tf.errors.OpError) as error:
            errors.append(f"{directory}: {error}")
    raise RuntimeError("; ".join(errors))


def _build(target: Path) -> None:
    compile_flags = [*tf.sysconfig.get_compile_flags(), f"-I{_SOURCE.parent}"]
    compile_library(target, _SOURCE, compile_flags, tf.sysconfig.get_link_flags())


def _supported_platform() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


def _load():
    return load_cached(_library_name(), _build, lambda target: tf.load_op_library(str(target)))


def _is_zero_fill(tensor) -> bool:
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


def _register_gradient(module):
    @tf.RegisterGradient("KerasLstmSequence")
    def _grad(op, dh_seq, dc_seq, _dgates, dh_last, dc_last):
        from keras_lstm.kernels._while_loop import recurrent_kernel_grad

        x, kernel, bias, recurrent_kernel, h0, c0, mask = op.inputs
        h_seq, c_seq, gates = op.outputs[:3]
        if not op.get_attr("keep_for_gradient"):
            # Run in inference mode, which keeps nothing for the gradient:
            # run the forward pass again, keeping it.
            h_seq, c_seq, gates, _, _ = module.keras_lstm_sequence(
                x, kernel, bias, recurrent_kernel, h0, c0, mask
            )
        empty = tf.zeros((0,), x.dtype)
        dh_seq, dc_seq, dh_last, dc_last = (
            empty if grad is None or _is_zero_fill(grad) else grad
            for grad in (dh_seq, dc_seq, dh_last, dc_last)
        )
        dz, dh0, dc0, dbias = module.keras_lstm_sequence_grad(
            recurrent_kernel, h0, c0, mask, c_seq, gates, dh_seq, dc_seq, dh_last, dc_last
        )
        # The input and weight gradients as single matmuls over all steps.
        flat_dz = tf.reshape(dz, (-1, dz.shape[-1]))
        dx = tf.reshape(tf.matmul(flat_dz, kernel, transpose_b=True), tf.shape(x))
        dkernel = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), flat_dz, transpose_a=True)
        dbias = dbias if bias.shape[0] else None
        drecurrent = recurrent_kernel_grad(h0, h_seq, dz)
        return dx, dkernel, dbias, drecurrent, dh0, dc0, None


def native_module():
    """The loaded op library, or `None` when it is disabled or cannot be built."""
    with _state_lock:
        if "module" not in _state:
            module = None
            # Elsewhere the TF-ops path is simply the implementation: no warning.
            if os.environ.get("KERAS_LSTM_NATIVE", "1") != "0" and _supported_platform():
                try:
                    module = _load()
                    _register_gradient(module)
                except Exception as error:  # any failure means: use the TF-ops path
                    warnings.warn(
                        "keras_lstm: native LSTM kernel unavailable, using TensorFlow ops "
                        f"({error})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _state["module"] = module
        return _state["module"]


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
):
    """The native twin of `_while_loop.lstm_sequence_projecting` (float32, CPU).

    `x` is time-major (T, B, D). Returns `(h_seq, c_seq, h_last, c_last)`: the final
    state comes as its own tensors too, so that a loss on it alone sends back no
    (T, B, H) gradient. Without `keep_for_gradient` the op keeps nothing for the
    backward pass (a gradient then runs the forward pass again) and `c_seq` is
    empty; `h_seq` is empty unless `return_sequences` or `keep_for_gradient`.
    """
    module = native_module()
    mask = tf.zeros((0,), tf.float32) if mask is None else tf.cast(mask, tf.float32)
    bias = tf.zeros((0,), tf.float32) if bias is None else bias
    h_seq, c_seq, _, h_last, c_last = module.keras_lstm_sequence(
        x,
        kernel,
        bias,
        recurrent_kernel,
        h0,
        c0,
        mask,
        keep_for_gradient=keep_for_gradient,
        return_sequences=return_sequences,
    )
    return h_seq, c_seq, h_last, c_last

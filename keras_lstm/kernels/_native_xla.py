"""Builds, caches and loads the XLA lowering of the native LSTM ops.

`lstm_sequence_xla.cc` gives the ops of `lstm_sequence.cc` kernels for XLA's
CPU compiler (`jit_compile=True`): each op becomes a custom call into this
library. The library holds glue only: the custom calls run the main
library's own maths (`keras_lstm_forward_rows` and the other C entries of
lstm_core.h), whose addresses it is given on loading, so the maths is
compiled once and for this CPU, with optimisation (the glue is not). It is
built and cached like the main library (see `_build` and `_cache`), only
when a function is first compiled with XLA or by `keras-lstm build`, and
only after the main library loaded (which defines the ops). If it cannot
be built, XLA keeps the `tf.while_loop` path after a one-line warning; the
main library is unaffected.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from pathlib import Path

import tensorflow as tf

from keras_lstm.kernels import _build, _cache, _native

_HERE = Path(__file__).parent
_state: dict = {}
_state_lock = threading.Lock()


@functools.cache
def library() -> _build.Library:
    """The XLA library: XLA kernels for the three ops and the custom calls they emit."""
    include = Path(tf.sysconfig.get_include())
    return _build.Library(
        stem="lstm_sequence_xla",
        units=(_build.Unit(_HERE / "lstm_sequence_xla.cc"),),
        headers=(_HERE / "lstm_core.h",),
        # Headers of XLA's own dependencies, shipped in the wheel outside the include root.
        compile_flags=(
            *tf.sysconfig.get_compile_flags(),
            f"-I{_HERE}",
            f"-I{include / 'external' / 'highwayhash'}",
            f"-I{include / 'external' / 'farmhash_archive' / 'src'}",
        ),
        # The XLA op kernel and custom-call registries live in libtensorflow_cc.
        link_flags=(*tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2"),
    )


def library_name() -> str:
    """The XLA library's `STEM-KEY` on this machine (see `_cache`)."""
    return _cache.library_name(library(), tf.__version__)


def _load_library(target: Path, main: Path) -> Path:
    tf.load_library(str(target))
    maths = ctypes.CDLL(str(main))  # already loaded: the same handle
    # The custom calls split the batch over their own threads: no more than
    # TensorFlow's intra-op setting, when one was made (0: none).
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    ctypes.CDLL(str(target)).keras_lstm_xla_init(
        ctypes.cast(maths.keras_lstm_forward_rows, ctypes.c_void_p),
        ctypes.cast(maths.keras_lstm_backward_rows, ctypes.c_void_p),
        ctypes.cast(maths.keras_lstm_kept_step_grads, ctypes.c_void_p),
        ctypes.cast(maths.keras_lstm_order_rows, ctypes.c_void_p),
        ctypes.cast(maths.keras_lstm_kept_positions, ctypes.c_void_p),
        ctypes.cast(maths.keras_lstm_add_up_kept_sums, ctypes.c_void_p),
        ctypes.c_int(threads),
    )
    return target


def load(force: bool = False):
    """`(path, record)` of the XLA library, built first if needed; raises on any failure.

    The main library must be loaded (`_native.native_module()`).
    """
    main = _native.loaded_path()
    if main is None:
        raise RuntimeError("the main native library is not loaded")
    return _cache.load_or_build(
        library(), library_name(), lambda path: _load_library(path, main), force=force
    )


def xla_library():
    """The path of the loaded XLA library, or `None` when it is disabled or cannot be built.

    `None` too whenever the main native library is unavailable (including
    `KERAS_LSTM_NATIVE=0`), since the ops it lowers are defined there.
    """
    if _native.native_module() is None:
        return None
    with _state_lock:
        if "library" not in _state:
            library_path = None
            try:
                library_path, _state["record"] = load()
            except Exception as error:  # any failure means: XLA keeps the TF-ops path
                _state["error"] = error
                warnings.warn(
                    _native.unavailable_warning(
                        "native LSTM kernel under XLA (jit_compile)", "TensorFlow ops there", error
                    ),
                    RuntimeWarning,
                    stacklevel=2,
                )
            _state["library"] = library_path
        return _state["library"]

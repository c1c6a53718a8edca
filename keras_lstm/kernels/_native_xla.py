"""Builds, caches and loads the XLA lowering of the native LSTM ops.

`lstm_sequence_xla.cc` gives the ops of `lstm_sequence.cc` kernels for XLA's
CPU compiler (`jit_compile=True`): each op becomes a custom call into this
library, which runs the same maths as the TensorFlow kernels. It is its own
shared library, built and cached like the main one (see `_native`) but only
when a function is first compiled with XLA, and only after the main library
loaded (which defines the ops). If it cannot be built, XLA keeps the
`tf.while_loop` path after a one-line warning; the main library is unaffected.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import warnings
from pathlib import Path

import tensorflow as tf

from keras_lstm.kernels import _native

_SOURCES = (
    Path(__file__).with_name("lstm_sequence_xla.cc"),
    Path(__file__).with_name("lstm_core.h"),
)
_FLAGS = _native._FLAGS
_state: dict = {}
_state_lock = threading.Lock()


def _compile_flags() -> list[str]:
    include = Path(tf.sysconfig.get_include())
    # Headers of XLA's own dependencies, shipped in the wheel outside the include root.
    return [
        *tf.sysconfig.get_compile_flags(),
        f"-I{_SOURCES[0].parent}",
        f"-I{include / 'external' / 'highwayhash'}",
        f"-I{include / 'external' / 'farmhash_archive' / 'src'}",
    ]


def _link_flags() -> list[str]:
    # The XLA op kernel and custom-call registries live in libtensorflow_cc.
    return [*tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2"]


def _library_name() -> str:
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.read_bytes())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_FLAGS + tuple(_compile_flags()) + tuple(_link_flags())).encode())
    digest.update("\n".join(_native._cpu_identity()).encode())
    return f"lstm_sequence_xla_{digest.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    _native.compile_library(target, _SOURCES[0], _compile_flags(), _link_flags())


def _load_library(target: Path) -> Path:
    tf.load_library(str(target))
    # The custom calls split the batch over their own threads: no more than
    # TensorFlow's intra-op setting, when one was made (0: none).
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    ctypes.CDLL(str(target)).keras_lstm_xla_set_max_threads(ctypes.c_int(threads))
    return target


def _load() -> Path:
    return _native.load_cached(_library_name(), _build, _load_library)


def xla_library():
    """The path of the loaded XLA library, or `None` when it is disabled or cannot be built.

    `None` too whenever the main native library is unavailable (including
    `KERAS_LSTM_NATIVE=0`), since the ops it lowers are defined there.
    """
    if _native.native_module() is None:
        return None
    with _state_lock:
        if "library" not in _state:
            library = None
            try:
                library = _load()
            except Exception as error:  # any failure means: XLA keeps the TF-ops path
                warnings.warn(
                    "keras_lstm: native LSTM kernel unavailable under XLA (jit_compile), "
                    f"using TensorFlow ops there ({error})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _state["library"] = library
        return _state["library"]

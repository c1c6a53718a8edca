"""`keras-lstm doctor` and `keras-lstm build`: what runs here and why, and building ahead."""

from __future__ import annotations

import platform
import sys
import time
import warnings

# The vector extensions that decide how the kernel is built and how fast it runs.
_FEATURES = {
    "x86_64": (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
    ),
    "aarch64": ("asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm"),
}


def _library_state(module, compiler: str):
    """`(state, detail)` of one library in the cache, without building it; never raises."""
    from keras_lstm.kernels import _build, _cache

    try:
        entry = _cache.Entry(_cache.open_cache(), module.library_name())
        failure = _cache.failed_record(entry, compiler)
        if failure is not None:
            return "failed", f"{failure.get('reason')} (log: {entry.failure})"
        record = _cache.verified_record(entry, compiler)
    except _cache.CacheError as error:
        return "unsafe", str(error)
    except Exception as error:  # a report, not a traceback: say it in one line
        return "unreadable", (str(error).splitlines() or [type(error).__name__])[0]
    if record is None:
        last = _cache._read_json(entry.failure) or {}
        if last.get("kind") in _build.ENVIRONMENT_KINDS:  # tried again on next use
            return "missing", f"{entry.library.name} (the last build failed: {last.get('reason')})"
        return "missing", entry.library.name
    flags = " ".join(record.get("cpu_flags", [])) or "no CPU flags"
    built = record.get("built", "?").replace("T", " ")[:16]
    return "built", (
        f"{entry.library.name}: built {built} in {record.get('seconds')} s, "
        f"{record.get('flag_set')} ({flags}), digest checked"
    )


def report() -> tuple[list[str], int]:
    """The doctor's lines and exit status (1 where a native kernel that should run cannot)."""
    import keras
    import tensorflow as tf

    import keras_lstm
    from keras_lstm.kernels import _build, _cache, _native, _native_xla

    lines = [f"keras-lstm {keras_lstm.__version__}"]
    add = lines.append
    add(f"  Python       {platform.python_version()} ({sys.platform}, {_build.machine()})")
    backend = keras.backend.backend()
    add(f"  Keras        {keras.__version__}, backend {backend}")
    gpus = tf.config.list_physical_devices("GPU")
    add(f"  TensorFlow   {tf.__version__} ({f'{len(gpus)} GPU' if gpus else 'CPU only'})")
    features = _build.cpu_features()
    wanted = _FEATURES.get(_build.machine(), ())
    have = [f for f in wanted if f in features]
    lacks = [f for f in wanted if f not in features]
    add(f"  CPU          {_build.cpu_name()}")
    add(f"               has: {' '.join(have) or '-'}; lacks: {' '.join(lacks) or '-'}")
    compiler = _build.compiler_identity()
    add(f"  Compiler     {compiler if compiler != 'none' else 'none (set CXX or install g++)'}")
    sets = ", ".join(f"{s.name} ({' '.join(s.flags) or 'none'})" for s in _build.target_flag_sets())
    add(f"  CPU flags    tried in turn: {sets}")
    status = 0
    disabled = _native.disabled_reason()
    directory = _cache.cache_dir()
    try:
        directory = _cache.open_cache()  # the cache's own folder inside the one named
        cache_problem = None
        add(f"  Cache        {directory} (private to this user)")
    except _cache.CacheError as error:
        cache_problem = str(error)
        add(f"  Cache        {directory}: {cache_problem}")

    states = {}
    if disabled is None and cache_problem is None:
        for key, module in (("native", _native), ("xla", _native_xla)):
            try:
                states[key] = _library_state(module, compiler)
            except _cache.CacheError as error:
                states[key] = ("unsafe", str(error))
            add(f"    {key:<6}     {states[key][0]}: {states[key][1]}")
        others = _cache.other_keys(directory, {_native.library_name(), _native_xla.library_name()})
        if others:
            add(f"    other      {len(others)} files of other keys (`keras-lstm build --prune`)")

    add("GatedLSTM runs")
    if backend != "tensorflow":
        add(
            f"  every call   Keras's step loop around GatedLSTMCell (the fused op is for the "
            f"TensorFlow backend; this one is {backend})"
        )
        return lines, status
    if disabled is not None:
        add(f"  every call   TensorFlow ops (tf.while_loop): {disabled}")
    elif cache_problem is not None:
        add(f"  every call   TensorFlow ops (tf.while_loop): {cache_problem}")
        status = 1
    else:
        for key, mode, how in (
            ("native", "eager/graph ", "native kernel"),
            ("xla", "jit_compile ", "native kernel as an XLA custom call"),
        ):
            state, detail = states[key]
            if state == "built":
                loader = _native.native_module if key == "native" else _native_xla.xla_library
                loads = _loads(loader)
                text = how if loads else f"TensorFlow ops: built but does not load ({detail})"
                status = status if loads else 1
            elif state == "missing":
                cost = "about 25 s" if key == "native" else "about 40 s"
                text = (
                    f"{how}, after a one-time build on first use ({cost}; "
                    "`keras-lstm build` builds it now)"
                )
            else:
                text = f"TensorFlow ops (tf.while_loop): {detail}"
                status = 1
            add(f"  {mode} {text}")
        if gpus:
            add("  on a GPU     TensorFlow ops (the native kernel is for the CPU)")
    if disabled is None and cache_problem is None:
        from keras_lstm import kernels

        add("  mixed policy as above, in float32 (cast in and out); float64: TensorFlow ops")
        # Only a built library says which instructions it has (asking loads it).
        if states["native"][0] == "built" and _loads(_native.native_module):
            bf16 = kernels.bf16_products()
            if bf16:
                add(f"  bfloat16     products with bfloat16 operands, float32 sums ({bf16})")
            elif "avx512_bf16" in _build.cpu_features():
                add("  bfloat16     float32 products (the kernel was built without AVX512-BF16)")
            else:
                add("  bfloat16     float32 products (this CPU has no AVX512-BF16)")
        # The options the native kernel computes, and the others, from the one list.

        fused = ", ".join(kernels.NATIVE_CELL_OPTIONS)
        others = [
            name
            for name in keras_lstm.GatedLSTMCell.MATHS_OPTIONS
            if name not in kernels.NATIVE_CELL_OPTIONS
        ]
        add(f"  options      {fused}: as above (fused where the native kernel runs)")
        add(
            f"               {', '.join([*others, 'unroll=True'])}: Keras's step loop around "
            "GatedLSTMCell"
        )
    else:
        add("  mixed policy TensorFlow ops, in the policy's dtype")
        add(
            "  options      Keras's step loop around GatedLSTMCell "
            "(fusing them needs the native kernel)"
        )
    return lines, status


def _loads(loader) -> bool:
    """Whether `loader()` (`native_module` or `xla_library`) gives a library; no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return loader() is not None


def doctor() -> int:
    lines, status = report()
    print("\n".join(lines))
    return status


def build(force: bool, jit_compile: bool, prune: bool) -> int:
    from keras_lstm.kernels import _cache, _native, _native_xla, build_native

    started = time.monotonic()
    try:
        records = build_native(force=force, jit_compile=jit_compile)
    except RuntimeError as error:
        print(f"keras-lstm build: {error}", file=sys.stderr)
        print("keras-lstm build: `keras-lstm doctor` shows the compiler's output", file=sys.stderr)
        return 1
    for key, record in records.items():
        flags = " ".join(record.get("cpu_flags", [])) or "no CPU flags"
        print(
            f"{key:<6} {record['path']} ({record.get('flag_set')}: {flags}; built in "
            f"{record.get('seconds')} s)"
        )
    print(f"ready in {time.monotonic() - started:.1f} s")
    if prune:
        keep = {_native.library_name(), _native_xla.library_name()}
        removed = _cache.prune(_cache.open_cache(), keep)
        print(f"removed {len(removed)} files of other keys")
    return 0

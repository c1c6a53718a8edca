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

    native, native_xla, status = _native_states(states, disabled, cache_problem, status)
    add("GatedLSTM runs (route: why not a faster one)")
    lines.extend(_route_lines(backend, bool(gpus), native, native_xla))
    if "missing" in (states.get("native", ("",))[0], states.get("xla", ("",))[0]):
        add("  (the native kernel builds on first use, once: `keras-lstm build` builds it now)")
    if not native and states["native"][0] == "built":
        add(f"  bfloat16     {_bf16_products()}")
    return lines, status


def _native_states(states, disabled, cache_problem, status):
    """`(native, native_xla, status)`: the `_routes.Context` fields for this machine, read
    from the cache without building (`""` where a library runs or will build on first use)."""
    from keras_lstm.kernels import _native, _native_xla

    if disabled is not None:
        return disabled, disabled, status
    if cache_problem is not None:
        reason = "the native kernel is not loaded from this cache (see Cache above)"
        return reason, reason, 1
    reasons = {}
    for key, loader, what in (
        ("native", _native.native_module, "the native kernel"),
        ("xla", _native_xla.xla_library, "the native kernel's XLA library"),
    ):
        state, detail = states[key]
        reasons[key] = ""
        if state == "built" and not _loads(loader):
            reasons[key] = f"{what} is built but does not load ({detail})"
        elif state not in ("built", "missing"):
            reasons[key] = f"{what} is unavailable here ({detail})"
        status = 1 if reasons[key] else status
    return reasons["native"], reasons["xla"], status


def _route_lines(backend: str, gpu: bool, native: str, native_xla: str) -> list[str]:
    """One line per kind of call: the route `_routes.resolve` picks here, and its reason."""
    import dataclasses

    from keras_lstm import _routes, options

    fused = tuple(o.name for o in options.OPTIONS if o.changes_maths and o.native_inputs)
    unfused = tuple(o.name for o in options.OPTIONS if o.changes_maths and not o.native_inputs)
    here = _routes.Context(backend, "gpu" if gpu else "cpu", native=native, native_xla=native_xla)
    rows = [
        ("eager/graph ", _routes.Config(), {}),
        ("jit_compile ", _routes.Config(), {"xla": True}),
        ("mixed policy", _routes.Config(), {"dtype": "bfloat16"}),
        ("float64     ", _routes.Config(), {"dtype": "float64"}),
        ("options     ", _routes.Config(changes=fused), {}),
        ("unroll=True ", _routes.Config(unroll=True), {}),
        ("keras RNN   ", _routes.Config(in_keras_rnn=True), {}),
        ("SavedModel  ", _routes.Config(), {"export": "saved_model"}),
        ("ONNX        ", _routes.Config(), {"export": "onnx"}),
        ("LiteRT      ", _routes.Config(), {"export": "litert"}),
    ]
    if unfused:
        rows.insert(5, ("options     ", _routes.Config(changes=unfused, not_native=unfused), {}))
    lines = []
    for label, config, changes in rows:
        decision = _routes.resolve(config, dataclasses.replace(here, **changes))
        reason = f": {decision.reason}" if decision.reason else ""
        lines.append(f"  {label} {decision.route.description}{reason}")
        if label.strip() == "options":
            lines.append(f"               (any of {', '.join(config.changes)})")
    return lines


def _bf16_products() -> str:
    from keras_lstm import kernels
    from keras_lstm.kernels import _build

    if kernels.bf16_products():
        return f"products with bfloat16 operands, float32 sums ({kernels.bf16_products()})"
    if "avx512_bf16" in _build.cpu_features():
        return "float32 products (the kernel was built without AVX512-BF16)"
    return "float32 products (this CPU has no AVX512-BF16)"


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

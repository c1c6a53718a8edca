"""The kernel's maths compiles for CPUs this machine is not (compile only, nothing runs).

The native kernel is built on the user's machine with `-march=native` (and
friends, `_build.target_flag_sets`), so a CPU we never run on can break the
build where CI cannot see it: `-march=native` on an Intel CPU with
AVX512-FP16 once failed in the Eigen headers of the TensorFlow wheel. Here
`lstm_core.cc`, the one file compiled for the CPU (the glue is compiled for
the generic target, so it is the same on every CPU), is compiled with exactly
the build's flags, `native` replaced by each named target: x86-64 levels,
Intel server generations, AMD Zen, and aarch64 cores through a cross
compiler (`aarch64-linux-gnu-g++`, Debian's `g++-aarch64-linux-gnu`) when the
machine is x86-64. A target the compiler does not know is skipped, named.

The default suite compiles one target per distinct set of extensions as far as
`-fsyntax-only` goes: parsing and template instantiation, where the AVX512-FP16
break showed (about 5 s a target). The slow suite (`pytest -m slow`) compiles
every target to an object file, which adds code generation and the inlining of
intrinsics, where a target mismatch shows only then (about 20 s a target with
AVX-512).

Where this CPU can run a narrower target, the slow suite also runs the maths
built for it: the steps' products are written over the build's vector width
(`PackedProduct` in lstm_core.cc: SSE, AVX2 and AVX-512 pack and block them
differently), so `tests/lstm_core_driver.cc` runs a forward and a backward
pass built for each x86-64 level this CPU has, and the results must match a
NumPy reference and each other.
"""

from __future__ import annotations

import concurrent.futures
import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keras_lstm.kernels import _build, _native

MATHS = Path(_native.__file__).with_name("lstm_core.cc")


def _compiler_for(arch: str) -> str | None:
    if arch == _build.machine():
        return _build.find_compiler()
    return shutil.which(f"{arch}-linux-gnu-g++")


@functools.cache
def _accepts(compiler: str, flags: tuple[str, ...]) -> bool:
    probe = subprocess.run(
        [compiler, *flags, "-x", "c++", "-E", "-", "-o", "/dev/null"],
        input="",
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0


CASES = [("x86_64", t) for t in _build.X86_64_TARGETS] + [
    ("aarch64", t) for t in _build.AARCH64_TARGETS
]
# The default suite parses one target per set of extensions Eigen's code paths
# differ on (SSE4, AVX2, AVX-512 with BF16 and FP16 held off, Zen, NEON, SVE
# with BF16), and the newest targets where the compiler knows them; the slow
# suite compiles every target to an object file.
DEFAULT_CASES = [
    case
    for case in CASES
    if case[1]
    in {
        "x86-64-v2",
        "x86-64-v3",
        "sapphirerapids",
        "graniterapids",
        "znver3",
        "znver4",
        "znver5",
        "generic",
        "neoverse-v1",
        "neoverse-v2",
    }
]


def _compile_all(folder: Path, cases, codegen: bool) -> dict:
    """Compiles the cases the compilers here accept, two at a time: {case: (status, log)}."""
    include_flags = _native.library().compile_flags

    def compile_case(case):
        arch, target = case
        compiler = _compiler_for(arch)
        flags = _build.flags_for_target(target, arch)
        if compiler is None or not _accepts(compiler, flags):
            return None
        out = folder / f"{arch}-{target}.o"
        command = [
            compiler,
            *_build.COMMON_FLAGS,
            *_build.MATHS_FLAGS,
            *flags,
            *include_flags,
            *(("-c", "-o", str(out)) if codegen else ("-fsyntax-only",)),
            str(MATHS),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        return result.returncode, " ".join(command) + "\n" + result.stderr[-3000:]

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(compile_case, cases), strict=True))


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return _compile_all(tmp_path_factory.mktemp("parsed"), DEFAULT_CASES, codegen=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile_all(tmp_path_factory.mktemp("compiled"), CASES, codegen=True)


def _check(outcome, arch, target):
    if outcome is None:
        compiler = _compiler_for(arch)
        if compiler is None:
            pytest.skip(f"no {arch} compiler here (install g++-{arch.replace('_', '-')}-linux-gnu)")
        pytest.skip(f"{compiler} does not know {arch} target {target!r}")
    status, log = outcome
    assert status == 0, log


def _ids(cases):
    return [f"{a}-{t}" for a, t in cases]


on_linux = pytest.mark.skipif(
    not _build.supported_platform(), reason="the kernel builds on Linux only"
)


@on_linux
@pytest.mark.parametrize(("arch", "target"), DEFAULT_CASES, ids=_ids(DEFAULT_CASES))
def test_the_kernel_maths_parses_and_instantiates_for(parsed, arch, target):
    _check(parsed[(arch, target)], arch, target)


@on_linux
@pytest.mark.slow
@pytest.mark.parametrize(("arch", "target"), CASES, ids=_ids(CASES))
def test_the_kernel_maths_compiles_to_an_object_for(compiled, arch, target):
    _check(compiled[(arch, target)], arch, target)


def test_the_native_target_of_this_machine_is_among_the_checked_ones():
    # The matrix would mean little if the build used other flags than those it checks.
    first = _build.target_flag_sets()[0].flags
    assert first == _build.flags_for_target("native")


@on_linux
def test_syntax_only_catches_the_avx512fp16_break_the_first_flag_set_avoids(tmp_path):
    # What the matrix is for: without -mno-avx512fp16, Sapphire Rapids fails in the
    # Eigen headers of the TensorFlow wheel, and parsing alone shows it.
    compiler = _compiler_for("x86_64")
    flags = ("-march=sapphirerapids",)
    if compiler is None or not _accepts(compiler, flags):
        pytest.skip("no x86-64 compiler that knows sapphirerapids here")
    command = [compiler, *_build.COMMON_FLAGS, *flags, *_native.library().compile_flags]
    result = subprocess.run(
        [*command, "-fsyntax-only", str(MATHS)], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        pytest.skip("this TensorFlow's Eigen compiles AVX512-FP16: the break is fixed upstream")
    assert "PacketMathFP16.h" in result.stderr


DRIVER = Path(__file__).with_name("lstm_core_driver.cc")
CASES_RUN = ("plain", "projection", "short")  # the driver's cases
# The x86-64 levels and the CPU flags (as /proc/cpuinfo names them) each needs
# beyond the one before.
LEVELS = {
    "x86-64-v2": {"sse4_2", "popcnt", "ssse3"},
    "x86-64-v3": {"avx2", "fma", "bmi2", "movbe"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _runnable_levels() -> list[str]:
    if _build.machine() != "x86_64":
        return []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    levels, needed = [], set()
    for level, adds in LEVELS.items():
        needed |= adds
        if needed <= flags:
            levels.append(level)
    return levels


@pytest.fixture(scope="module")
def driver_results(tmp_path_factory) -> dict:
    """{(level, case): {name: values}} from the driver built for each runnable level."""
    folder = tmp_path_factory.mktemp("driver")
    compiler = _build.find_compiler()
    levels = [level for level in _runnable_levels() if _accepts(compiler, (f"-march={level}",))]

    def build_and_run(level):
        binary = folder / f"driver-{level}"
        command = [
            compiler,
            *_build.COMMON_FLAGS,
            *_build.MATHS_FLAGS,
            *_build.flags_for_target(level),
            *_native.library().compile_flags,
            str(DRIVER),
            str(MATHS),
            "-o",
            str(binary),
        ]
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        assert built.returncode == 0, " ".join(command) + "\n" + built.stderr[-3000:]
        found = {}
        for case in CASES_RUN:
            run = subprocess.run([str(binary), case], capture_output=True, text=True, check=True)
            values: dict[str, list[float]] = {}
            for line in run.stdout.splitlines():
                name, _, value = line.split()
                values.setdefault(name, []).append(float(value))
            found[(level, case)] = {name: np.array(v) for name, v in values.items()}
        return found

    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for found in pool.map(build_and_run, levels):
            results.update(found)
    return results


def _driver_values(count, seed, scale):
    """The driver's `Values`: the same numbers, in float32."""
    out, state = np.empty(count, np.float32), (seed * 2654435761 + 1) % 2**32
    for i in range(count):
        state = (state * 1664525 + 1013904223) % 2**32
        out[i] = np.float32(scale) * (np.float32(state >> 8) / np.float32(8388608) - 1)
    return out


def _driver_mask(steps):
    """The driver's mask, (steps, 13): right padding, an empty row and holes."""
    lengths = np.array([6, 2, 5, 0, 6, 1, 3, 4, 6, 2, 5, 3, 1])
    mask = np.arange(steps)[:, None] < lengths[None, :]
    mask[2, 0] = False
    if steps > 4:
        mask[4, 8] = False
    return mask


def _driver_forward(case: str):
    """The driver's forward pass in NumPy: h_seq (T, B, P) and c_last (B, H)."""
    projection = case == "projection"
    batch, inputs, units = 13, 3, 7
    width = 5 if projection else units
    mask = _driver_mask(6)
    x = _driver_values(6 * batch * inputs, 1, 1.5).reshape(6, batch, inputs)
    steps = 3 if case == "short" else 6  # the short case runs the first 3 steps
    kernel = _driver_values(inputs * 4 * units, 2, 0.5).reshape(inputs, 4 * units)
    recurrent = _driver_values(width * 4 * units, 3, 0.5).reshape(width, 4 * units)
    bias = _driver_values(4 * units, 4, 0.5)
    h = _driver_values(batch * width, 5, 1.0).reshape(batch, width).astype(np.float64)
    c = _driver_values(batch * units, 6, 1.0).reshape(batch, units).astype(np.float64)
    proj = _driver_values(units * width, 7, 0.5).reshape(units, width)

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    h_seq = []
    for t in range(steps):
        z = x[t] @ kernel + h @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h_new = sigmoid(o) * np.tanh(c_new)
        if projection:
            h_new = h_new @ proj
        keep = mask[t][:, None]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        h_seq.append(h)
    return np.stack(h_seq).ravel(), c.ravel()


@on_linux
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_RUN)
def test_the_kernel_maths_built_for_each_vector_width_this_cpu_runs_agrees(driver_results, case):
    results = driver_results
    levels = sorted({level for level, _ in results})
    if not levels:
        pytest.skip("this CPU runs none of the x86-64 levels (or is not x86-64)")
    h_seq, c_last = _driver_forward(case)
    widest = results[(levels[-1], case)]
    for level in levels:
        got = results[(level, case)]
        np.testing.assert_allclose(got["h_seq"], h_seq, atol=2e-5, err_msg=level)
        np.testing.assert_allclose(got["c_last"], c_last, atol=2e-5, err_msg=level)
        for name in ("dz", "dh0", "dc0", "db", "dx", "dkernels"):
            np.testing.assert_allclose(
                got[name], widest[name], atol=2e-5, err_msg=f"{level} {name}"
            )
        _check_kept_step_grads(got, case)


def _check_kept_step_grads(got, case):
    """The driver's KeptStepGrads against NumPy, from its own h_seq and dz."""
    steps, batch, inputs, units = (3 if case == "short" else 6), 13, 3, 7
    width = 5 if case == "projection" else units
    mask = _driver_mask(steps)
    x = _driver_values(6 * batch * inputs, 1, 1.5)[: steps * batch * inputs]
    x = x.reshape(steps, batch, inputs).astype(np.float64)
    kernel = _driver_values(inputs * 4 * units, 2, 0.5).reshape(inputs, 4 * units)
    h0 = _driver_values(batch * width, 5, 1.0).reshape(1, batch, width)
    h_seq = np.asarray(got["h_seq"]).reshape(steps, batch, width)
    dz = np.asarray(got["dz"]).reshape(steps, batch, 4 * units) * mask[..., None]
    h_prev = np.concatenate([h0, h_seq[:-1]])
    keep = mask[..., None]
    dx = (dz @ kernel.T.astype(np.float64)) * keep
    dkernels = np.concatenate(
        [np.einsum("tbd,tbg->dg", x * keep, dz), np.einsum("tbr,tbg->rg", h_prev * keep, dz)]
    )
    np.testing.assert_allclose(got["dx"], dx.ravel(), atol=1e-4)
    np.testing.assert_allclose(got["dkernels"], dkernels.ravel(), atol=1e-4)

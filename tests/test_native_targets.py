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
"""

from __future__ import annotations

import concurrent.futures
import functools
import shutil
import subprocess
from pathlib import Path

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

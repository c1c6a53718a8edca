"""Compiles the native kernels on the user's machine.

A library is a few C++ files (`Library.units`). One of them, the maths
(`lstm_core.cc`), is compiled for the CPU it will run on; the rest is glue to
TensorFlow and XLA, compiled for the compiler's generic target, so that only
the maths depends on the CPU. The CPU flags come as a list of sets, best
first (`target_flag_sets`): a set the compiler or the headers reject costs a
failed compile and the next one is tried. The set that built the library is
returned in the build record.

Why not plain `-march=native`: on Intel CPUs with AVX512-FP16 (Sapphire
Rapids and later) it turns on Eigen's half-precision packet code, which the
Eigen shipped in the TensorFlow wheel does not compile
(`PacketMathFP16.h: expected initializer before '<' token`), so the first set
keeps everything else of the CPU and drops that one extension.

Each compile runs under a small supervisor process holding the compiler's
whole process group: if the Python process that asked for the build dies
(killed, out of memory), the supervisor sees its pipe close and kills the
compiler and its children, so no `cc1plus` outlives the build. A compile
that neither prints nor uses the CPU for `silence_limit_s()` seconds (a hung
compiler, a file system that stopped answering) is stopped as well.

A failed build says what failed (`BuildError.kind`): the compiler, no space
on the disk, the compiler killed (out of memory), or a compile stopped as
timed out. The first two of those are the machine's, not the compiler's:
`_cache` does not remember them, and the next use builds again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import platform
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Flags of every compile: position-independent and quiet (the TensorFlow
# headers warn a lot). The maths is optimised and gets the CPU flags on top;
# the glue is not optimised: its work is a few calls per op call, not per
# element, and its compile is mostly parsing TensorFlow's and XLA's headers
# (the XLA glue: 38 s at -O0, 60 s at -O3, on one core here).
COMMON_FLAGS = ("-fPIC", "-w")
MATHS_FLAGS = ("-O3",)
GLUE_FLAGS = ("-O0",)
# A compile that takes longer than this is stuck, not slow (about 45 s is usual).
COMPILE_TIMEOUT_S = 900
# A compile that neither prints nor uses the CPU this long is stopped: a busy
# compiler prints nothing for most of a minute, but always uses the CPU.
SILENCE_S = 120.0
SILENCE_ENV = "KERAS_LSTM_BUILD_SILENCE_S"
# `run_supervised`'s status for a compile it stopped.
STOPPED = -1

# What a failed build failed on (`BuildError.kind`).
COMPILER = "compiler"
NO_SPACE = "no space"
KILLED = "killed"
TIMED_OUT = "timed out"
# Failures of the machine rather than of the compiler: tried again by the next use.
ENVIRONMENT_KINDS = (NO_SPACE, KILLED)
# How the compiler and the linker say so.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
_KILLED_TEXT = ("Killed signal terminated program", "internal compiler error: Killed")

# The CPU targets the compile-only test builds the maths for, where the
# compiler knows them: x86-64 levels, Intel server generations, AMD Zen; and
# aarch64 cores (Graviton 2/3/4, Grace, Ampere, A64FX).
X86_64_TARGETS = (
    "x86-64-v2",
    "x86-64-v3",
    "x86-64-v4",
    "skylake-avx512",
    "icelake-server",
    "sapphirerapids",
    "graniterapids",
    "znver3",
    "znver4",
    "znver5",
)
AARCH64_TARGETS = ("generic", "neoverse-n1", "neoverse-v1", "neoverse-n2", "neoverse-v2", "a64fx")

# The features each x86-64 micro-architecture level needs, as /proc/cpuinfo names them.
_X86_64_V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


class BuildError(RuntimeError):
    """A library could not be built. `reason` is one line; `log` what the compiler said;
    `kind` what failed (`COMPILER`, `NO_SPACE`, `KILLED`, `TIMED_OUT`)."""

    def __init__(
        self, reason: str, log: str = "", attempts: list | None = None, kind: str = COMPILER
    ):
        super().__init__(reason)
        self.reason = reason
        self.log = log
        self.attempts = attempts or []
        self.kind = kind


def failure_kind(status: int, log: str) -> str:
    """What a failed compile or link (`status`, its output `log`) failed on."""
    if status == STOPPED:
        return TIMED_OUT
    if any(text in log for text in _NO_SPACE_TEXT):
        return NO_SPACE
    # The supervisor exits with 128 + the signal that ended the compiler.
    if status in (128 + 9, 128 + 15, -9, -15) or any(text in log for text in _KILLED_TEXT):
        return KILLED
    return COMPILER


def silence_limit_s() -> float:
    """How long a compile may neither print nor compute (`KERAS_LSTM_BUILD_SILENCE_S`)."""
    try:
        value = float(os.environ.get(SILENCE_ENV, SILENCE_S))
    except ValueError:
        return SILENCE_S
    return value if value > 0 else SILENCE_S


@dataclass(frozen=True)
class FlagSet:
    """CPU flags for the maths: a name for records and messages, and the flags."""

    name: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Unit:
    """One C++ file of a library; `per_cpu` if it is compiled with the CPU flags."""

    source: Path
    per_cpu: bool = False


@dataclass(frozen=True)
class Library:
    """What to compile and how to link one shared library."""

    stem: str  # the file name's start, e.g. "lstm_sequence"
    units: tuple[Unit, ...]
    headers: tuple[Path, ...]  # part of the cache key, not compiled on their own
    compile_flags: tuple[str, ...]  # include paths and defines, for every unit
    link_flags: tuple[str, ...]


@dataclass
class BuildRecord:
    """How a library was built: kept next to it in the cache (see `_cache`)."""

    flag_set: str
    cpu_flags: list[str]
    compiler: str
    seconds: float
    attempts: list[dict] = field(default_factory=list)


def machine() -> str:
    return platform.machine()


def supported_platform() -> bool:
    """Linux on x86-64 or aarch64: where the kernels are built and tested."""
    return sys.platform.startswith("linux") and machine() in ("x86_64", "aarch64")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature names (/proc/cpuinfo `flags` on x86, `Features` on aarch64)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "CPU part")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or machine()


def cpu_identity() -> str:
    """What a library built for this CPU depends on: for the cache key."""
    return f"{machine()} {cpu_name()} {' '.join(sorted(cpu_features()))}"


def target_flag_sets(arch: str | None = None, features=None) -> list[FlagSet]:
    """The CPU flag sets to try for the maths on this machine, best first.

    Each later set is safer: a compiler without `-mno-avx512fp16` (g++ < 12)
    never turns AVX512-FP16 on; an x86-64 level runs on every CPU that has
    its features; no flag at all is the compiler's default target.
    """
    arch = arch or machine()
    features = cpu_features() if features is None else features
    if arch == "x86_64":
        sets = [
            FlagSet("native", ("-march=native", "-mno-avx512fp16")),
            FlagSet("native-plain", ("-march=native",)),
        ]
        if _X86_64_V3 <= features:
            sets.append(FlagSet("x86-64-v3", ("-march=x86-64-v3",)))
        if _X86_64_V2 <= features:
            sets.append(FlagSet("x86-64-v2", ("-march=x86-64-v2",)))
    elif arch == "aarch64":
        sets = [FlagSet("native", ("-mcpu=native",))]
    else:
        sets = []
    return [*sets, FlagSet("generic", ())]


def flags_for_target(target: str, arch: str | None = None) -> tuple[str, ...]:
    """The first flag set of `target_flag_sets` with `native` replaced by `target`.

    What the compile-only test builds the maths with for a CPU it cannot run on.
    """
    arch = arch or machine()
    if arch == "aarch64":
        return (f"-mcpu={target}",)
    return (f"-march={target}", "-mno-avx512fp16")


def find_compiler() -> str | None:
    """`$CXX` if set (a path or a name on PATH), else `g++`; `None` if there is none."""
    wanted = os.environ.get("CXX") or "g++"
    return shutil.which(wanted)


# A compiler's `--version` line kept in records: g++'s is under 60 characters.
VERSION_CHARS = 200


@functools.cache
def _compiler_version(path: str, mtime_ns: int) -> str:
    """The first line of `path --version`, cut to `VERSION_CHARS`; the rest is never read."""
    del mtime_ns  # part of the cache key only: a replaced compiler is asked again
    try:
        process = subprocess.Popen(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError as error:
        return f"unknown ({error.strerror or type(error).__name__})"
    with process:
        head = _first_bytes(process.stdout, 4096, deadline=time.monotonic() + 10)
        process.kill()  # whatever else it prints is not needed
    lines = head.decode(errors="replace").strip().splitlines()
    return lines[0][:VERSION_CHARS] if lines else "unknown"


def _first_bytes(stream, limit: int, deadline: float) -> bytes:
    """Up to `limit` bytes of `stream`, stopping at the first newline, EOF or `deadline`."""
    head = b""
    while b"\n" not in head and len(head) < limit:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stream.fileno(), limit - len(head)) if ready else b""
        if not chunk:
            break
        head += chunk
    return head


def compiler_identity(path: str | None = None) -> str:
    """The compiler's path and the first line of its `--version`: e.g. for records."""
    path = path or find_compiler()
    if path is None:
        return "none"
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0
    return f"{path}: {_compiler_version(path, mtime)}"


# Runs argv[1:] in a process group of its own and kills that whole group when
# standard input closes: the parent holds the other end, so its death (however
# it dies) ends the compile and everything the compiler started.
_SUPERVISOR = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
def watch():
    while os.read(0, 4096):
        pass
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
status = child.wait()
os._exit(128 - status if status < 0 else status)
"""


def _usable_cpus() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# No more compiles at once than CPUs, however many libraries build at a time
# (`keras-lstm build` builds two: three compiles on two cores otherwise).
_compile_slots = threading.BoundedSemaphore(_usable_cpus())


def run_supervised(
    command: list[str], log: Path, timeout: float = COMPILE_TIMEOUT_S, silence: float | None = None
) -> int:
    """Runs `command`, its output to `log`; returns its exit status.

    `STOPPED` when it ran `timeout` seconds, or `silence` seconds (default
    `silence_limit_s()`) in which it neither wrote to `log` nor used the CPU.
    """
    silence = silence_limit_s() if silence is None else silence
    with _compile_slots, open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SUPERVISOR, *command],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        started = last_progress = time.monotonic()
        progress = None
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return process.wait(timeout=min(1.0, silence / 4))
                now = time.monotonic()
                seen = (os.fstat(out.fileno()).st_size, _cpu_ticks(process.pid))
                if seen != progress:
                    progress, last_progress = seen, now
                if now - last_progress > silence or now - started > timeout:
                    return STOPPED
        finally:
            process.stdin.close()  # ends the compile if it still runs
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def _cpu_ticks(supervisor: int) -> int:
    """The CPU time used so far by the compile under `supervisor`: its process group's.

    The compiler leads a process group of its own (the supervisor started it
    in a new session); a finished child's time counts in its parent's, so the
    sum only grows while any of them computes.
    """
    stats = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                stats.append((int(entry.name), int(fields[1]), int(fields[2]), fields))
    leaders = {pid for pid, parent, _, _ in stats if parent == supervisor}
    # utime, stime, cutime, cstime: fields 14 to 17 of /proc/PID/stat.
    return sum(
        sum(int(value) for value in fields[11:15])
        for _, _, group, fields in stats
        if group in leaders
    )


def _tail(path: Path, limit: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-limit:]
    return ""


def compile_object(
    compiler: str, unit: Unit, library: Library, cpu_flags: tuple[str, ...], out: Path
) -> tuple[int, str]:
    """Compiles one unit to the object file `out`; returns (status, compiler output)."""
    command = [
        compiler,
        *COMMON_FLAGS,
        *(MATHS_FLAGS if unit.per_cpu else GLUE_FLAGS),
        *cpu_flags,
        *library.compile_flags,
        "-c",
        str(unit.source),
        "-o",
        str(out),
    ]
    log = out.with_suffix(".log")
    status = run_supervised(command, log)
    text = _tail(log)
    if status == STOPPED:
        text += f"\n(stopped: {_stopped_why()})"
    return status, text


def _stopped_why() -> str:
    return (
        f"no output and no CPU use for {silence_limit_s():g} s ({SILENCE_ENV}), "
        f"or over {COMPILE_TIMEOUT_S} s in all"
    )


def _failure(
    compiler: str, what: str, status: int, text: str, attempts: list, folder: Path
) -> BuildError:
    """The `BuildError` of a compile or link in `folder` that failed on `what` (a file name)."""
    kind = failure_kind(status, text)
    name = Path(compiler).name
    reason = {
        COMPILER: f"{name} failed on {what}",
        NO_SPACE: f"no space left on the disk of {folder} (building {what}); the next use "
        "tries again",
        KILLED: f"{name} was killed on {what} (out of memory?); the next use tries again",
        TIMED_OUT: f"{name} was stopped on {what}: {_stopped_why()}",
    }[kind]
    return BuildError(reason, text, attempts, kind)


def _object(work: Path, unit: Unit) -> Path:
    return work / f"{unit.source.stem}.o"


def _link(compiler: str, library: Library, objects: list[Path], target: Path, attempts):
    """Links `objects` into the shared library `target`; `BuildError` if it fails."""
    link = [
        compiler,
        "-shared",
        *COMMON_FLAGS,
        *(str(path) for path in objects),
        "-o",
        str(target),
        *library.link_flags,
    ]
    work = target.parent
    log = work / "link.log"
    status = run_supervised(link, log)
    if status != 0:
        error = _failure(compiler, target.name, status, _tail(log), attempts, work.parent)
        if error.kind == COMPILER:
            error.reason = f"{Path(compiler).name} failed to link {target.name}"
            error.args = (error.reason,)
        raise error


def build_library(
    library: Library, target: Path, work: Path, flag_sets: list[FlagSet] | None = None
) -> BuildRecord:
    """Builds `library` into `target` (a path in `work`), trying each CPU flag set in turn.

    The glue units are compiled once, for the generic target, alongside the
    first attempt at the maths. Raises `BuildError` with a one-line reason
    and the compiler's output.
    """
    compiler = find_compiler()
    if compiler is None:
        wanted = os.environ.get("CXX") or "g++"
        raise BuildError(f"no C++ compiler: {wanted!r} is not on PATH (set CXX or install g++)")
    flag_sets = target_flag_sets() if flag_sets is None else flag_sets
    started = time.monotonic()
    attempts: list[dict] = []
    objects: dict[Path, Path] = {}
    # The glue compiles on a thread of its own while this one tries the maths.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        glue = {
            unit: pool.submit(compile_object, compiler, unit, library, (), _object(work, unit))
            for unit in library.units
            if not unit.per_cpu
        }
        per_cpu = [unit for unit in library.units if unit.per_cpu]
        # A library of glue only is built for the generic target.
        chosen = None if per_cpu else FlagSet("generic", ())
        for flag_set in flag_sets if per_cpu else ():
            if any(f.done() and f.result()[0] != 0 for f in glue.values()):
                break  # the glue cannot build: no flag set can help
            results = {
                unit: compile_object(compiler, unit, library, flag_set.flags, _object(work, unit))
                for unit in per_cpu
            }
            failed = [text for status, text in results.values() if status != 0]
            attempt = {"flag_set": flag_set.name, "flags": list(flag_set.flags), "ok": not failed}
            if failed:
                attempt["log"] = "\n".join(failed)[-4000:]
            attempts.append(attempt)
            for unit, (status, text) in results.items():
                error = _failure(compiler, unit.source.name, status, text, attempts, work.parent)
                if status != 0 and error.kind != COMPILER:
                    raise error  # another flag set would not help
            if not failed:
                chosen = flag_set
                objects.update({unit.source: _object(work, unit) for unit in per_cpu})
                break
        for unit, future in glue.items():
            status, text = future.result()
            if status != 0:
                raise _failure(compiler, unit.source.name, status, text, attempts, work.parent)
            objects[unit.source] = _object(work, unit)
    if chosen is None:
        tried = ", ".join(a["flag_set"] for a in attempts)
        raise BuildError(
            f"{Path(compiler).name} failed on the kernel maths with every CPU flag set ({tried})",
            "\n".join(a.get("log", "") for a in attempts),
            attempts,
        )
    _link(compiler, library, [objects[unit.source] for unit in library.units], target, attempts)
    return BuildRecord(
        flag_set=chosen.name,
        cpu_flags=list(chosen.flags),
        compiler=compiler_identity(compiler),
        seconds=round(time.monotonic() - started, 1),
        attempts=attempts,
    )

"""The native kernel's build and cache: flag fallbacks, remembered failures, a cache
that is safe to load from and heals when damaged, and no leftovers.

Most tests build a two-file library of a few lines with the real compiler
(under a second), through the same code that builds the LSTM kernel, and load
it with ctypes; the last ones run the real kernel's paths in fresh processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keras_lstm.kernels import _build, _cache

needs_compiler = pytest.mark.skipif(
    _build.find_compiler() is None or not _build.supported_platform(),
    reason="no C++ compiler or not Linux on x86-64/aarch64: nothing is built here",
)
pytestmark = needs_compiler


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache's own folder, inside the folder KERAS_LSTM_CACHE_DIR names."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(directory))
    return directory / _cache.OWN_FOLDER


@pytest.fixture
def tiny(tmp_path):
    """A library of a per-CPU file and a glue file, like the kernel's, and its name."""
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "maths.cc").write_text('extern "C" int answer() { return 42; }\n')
    (sources / "glue.cc").write_text('extern "C" int glue() { return 7; }\n')
    library = _build.Library(
        stem="lstm_sequence_test",
        units=(_build.Unit(sources / "maths.cc", per_cpu=True), _build.Unit(sources / "glue.cc")),
        headers=(),
        compile_flags=(),
        link_flags=(),
    )
    return library


def _load(path):
    return ctypes.CDLL(str(path)).answer()


class Compiler:
    """A compiler script set as CXX; `compiles()` counts the files it was asked to compile."""

    def __init__(self, folder: Path, name: str, body: str):
        self.path = folder / name
        self.log = folder / f"{name}.count"
        self.path.write_text(
            f'#!/bin/sh\ncase " $* " in *" -c "*) echo x >> "{self.log}";; esac\n' + body
        )
        self.path.chmod(0o755)

    def compiles(self) -> int:
        return len(self.log.read_text().split()) if self.log.exists() else 0


@pytest.fixture
def counting_compiler(tmp_path, monkeypatch):
    """CXX: the real compiler behind a script that counts its compiles."""
    compiler = Compiler(tmp_path, "counting-g++", f'exec "{_build.find_compiler()}" "$@"\n')
    monkeypatch.setenv("CXX", str(compiler.path))
    return compiler


@pytest.fixture
def failing_compiler(tmp_path, monkeypatch):
    """CXX: a compiler that fails every compile."""
    compiler = Compiler(
        tmp_path,
        "failing-g++",
        'case " $* " in *" --version "*) echo "failing-g++ 1.0"; exit 0;; esac\n'
        'echo "error: this compiler fails on purpose" >&2\n'
        "exit 1\n",
    )
    monkeypatch.setenv("CXX", str(compiler.path))
    return compiler


def _name(library):
    return _cache.library_name(library, "test")


def test_the_same_sources_reached_by_another_path_share_one_key(tmp_path):
    # An installed copy and a checkout, or `tests/../keras_lstm`: the same
    # files by content must not build twice.
    def library(folder):
        return _build.Library(
            stem="lstm_sequence_test",
            units=(_build.Unit(folder / "maths.cc", per_cpu=True),),
            headers=(),
            compile_flags=(f"-I{folder}",),
            link_flags=(),
        )

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "maths.cc").write_text("int answer() { return 42; }\n")
    (tmp_path / "one" / "sub").mkdir()
    roundabout = tmp_path / "one" / "sub" / ".."
    names = {_name(library(f)) for f in (tmp_path / "one", roundabout, tmp_path / "two")}
    assert len(names) == 1
    (tmp_path / "two" / "maths.cc").write_text("int answer() { return 43; }\n")
    assert _name(library(tmp_path / "two")) != _name(library(tmp_path / "one"))


# --- flags for this CPU and the fallbacks -------------------------------------------------


def test_first_flag_set_is_native_without_avx512fp16_then_safer_ones():
    v3 = _build._X86_64_V3
    names = [s.name for s in _build.target_flag_sets("x86_64", v3)]
    assert names == ["native", "native-plain", "x86-64-v3", "x86-64-v2", "generic"]
    assert _build.target_flag_sets("x86_64", v3)[0].flags == ("-march=native", "-mno-avx512fp16")
    # A CPU without AVX2 is never given an x86-64-v3 build, which would not run on it.
    old = [s.name for s in _build.target_flag_sets("x86_64", _build._X86_64_V2)]
    assert old == ["native", "native-plain", "x86-64-v2", "generic"]
    arm = _build.target_flag_sets("aarch64", frozenset())
    assert [s.flags for s in arm] == [("-mcpu=native",), ()]


def test_a_flag_set_the_compiler_rejects_falls_back_to_the_next_and_is_recorded(
    cache, tiny, monkeypatch
):
    sets = [
        _build.FlagSet("bogus", ("-mno-such-extension-anywhere",)),
        _build.FlagSet("generic", ()),
    ]
    monkeypatch.setattr(_build, "target_flag_sets", lambda *a, **k: sets)
    answer, record = _cache.load_or_build(tiny, _name(tiny), _load)
    assert answer == 42
    assert record["flag_set"] == "generic"
    assert [a["flag_set"] for a in record["attempts"]] == ["bogus", "generic"]
    assert "mno-such-extension-anywhere" in record["attempts"][0]["log"]
    on_disk = json.loads((cache / f"{_name(tiny)}.json").read_text())
    assert on_disk["flag_set"] == "generic" and on_disk["sha256"] == record["sha256"]


# --- a failure is remembered -------------------------------------------------------------


def test_a_failed_build_is_recorded_and_not_tried_again_until_forced(cache, tiny, failing_compiler):
    with pytest.raises(_build.BuildError, match="failing-g\\+\\+ failed"):
        _cache.load_or_build(tiny, _name(tiny), _load)
    tried = failing_compiler.compiles()
    assert tried >= 2  # the glue, and the maths with at least one flag set
    failure = json.loads((cache / f"{_name(tiny)}.failed.json").read_text())
    assert "fails on purpose" in failure["log"]
    with pytest.raises(_cache.FailedBefore) as error:
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert failing_compiler.compiles() == tried  # fell back at once, no compile
    assert error.value.record == cache / f"{_name(tiny)}.failed.json"
    with pytest.raises(_build.BuildError):
        _cache.load_or_build(tiny, _name(tiny), _load, force=True)  # a rebuild was asked for
    assert failing_compiler.compiles() > tried


def test_a_failure_recorded_for_another_compiler_is_tried_again(
    cache, tiny, failing_compiler, monkeypatch
):
    with pytest.raises(_build.BuildError):
        _cache.load_or_build(tiny, _name(tiny), _load)
    monkeypatch.delenv("CXX")  # back to the real g++: a new compiler gets its chance
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert not (cache / f"{_name(tiny)}.failed.json").exists()


# --- a cache that is safe to load from ---------------------------------------------------


def test_the_cache_directory_is_created_private(cache, tiny):
    _cache.load_or_build(tiny, _name(tiny), _load)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for path in cache.iterdir():
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path


def test_a_cache_directory_others_can_write_is_refused(cache, tiny, counting_compiler):
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    with pytest.raises(_cache.CacheError, match=f"{cache} is writable by others"):
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert counting_compiler.compiles() == 0 and list(cache.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(cache, tiny):
    cache.mkdir(parents=True, mode=0o700)
    os.chown(cache, 65534, 65534)
    with pytest.raises(_cache.CacheError, match="belongs to user id 65534"):
        _cache.load_or_build(tiny, _name(tiny), _load)


def test_a_library_others_can_write_is_refused_not_loaded(cache, tiny, counting_compiler):
    _cache.load_or_build(tiny, _name(tiny))  # built, not loaded: another process's
    library = cache / f"{_name(tiny)}.so"
    library.chmod(0o777)
    with pytest.raises(_cache.CacheError, match="writable by others"):
        _cache.load_or_build(tiny, _name(tiny), lambda path: pytest.fail("loaded"))
    assert library.exists() and counting_compiler.compiles() == 2  # neither loaded nor rebuilt over


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_of_another_user_is_refused(cache, tiny):
    _cache.load_or_build(tiny, _name(tiny))  # built, not loaded: another process's
    os.chown(cache / f"{_name(tiny)}.so", 65534, 65534)
    with pytest.raises(_cache.CacheError, match="belongs to user id 65534"):
        _cache.load_or_build(tiny, _name(tiny), lambda path: pytest.fail("loaded"))


def test_a_symlinked_lock_is_refused_and_its_target_left_alone(cache, tiny, tmp_path):
    _cache.open_cache()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (cache / f"{_name(tiny)}.lock").symlink_to(victim)
    with pytest.raises(_cache.CacheError, match="symbolic link"):
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert victim.read_text() == "precious"


def test_the_lock_is_not_truncated(cache, tiny):
    _cache.open_cache()
    lock = cache / f"{_name(tiny)}.lock"
    lock.write_text("kept")
    lock.chmod(0o600)
    _cache.load_or_build(tiny, _name(tiny), _load)
    assert lock.read_text() == "kept"


def test_a_failed_forced_rebuild_keeps_the_library_that_works(
    cache, tiny, tmp_path, counting_compiler, monkeypatch
):
    _cache.load_or_build(tiny, _name(tiny))
    failing = Compiler(tmp_path, "failing-g++", 'echo "error: broken" >&2; exit 1\n')
    monkeypatch.setenv("CXX", str(failing.path))
    with pytest.raises(_build.BuildError):
        _cache.load_or_build(tiny, _name(tiny), _load, force=True)
    monkeypatch.setenv("CXX", str(counting_compiler.path))
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert counting_compiler.compiles() == 2  # the first build only: nothing was rebuilt
    assert not (cache / f"{_name(tiny)}.failed.json").exists()


def test_a_library_that_builds_but_does_not_load_is_recorded(cache, tiny):
    def refuse(path):
        raise OSError()  # no message at all

    with pytest.raises(_build.BuildError, match="built but did not load: OSError"):
        _cache.load_or_build(tiny, _name(tiny), refuse)
    with pytest.raises(_cache.FailedBefore, match="did not load"):
        _cache.load_or_build(tiny, _name(tiny), _load)


# --- a damaged cache heals ---------------------------------------------------------------


def test_a_truncated_library_is_rebuilt_never_loaded(cache, tiny, counting_compiler):
    _cache.load_or_build(tiny, _name(tiny))  # built, not loaded: another process's
    library = cache / f"{_name(tiny)}.so"
    library.write_bytes(library.read_bytes()[:200])  # a disk that filled up mid-copy
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert counting_compiler.compiles() == 4


def test_a_replaced_library_is_rebuilt(cache, tiny, tmp_path, counting_compiler):
    _cache.load_or_build(tiny, _name(tiny))  # built, not loaded: another process's
    other = tmp_path / "other.cc"
    other.write_text('extern "C" int answer() { return -1; }\n')
    library = cache / f"{_name(tiny)}.so"
    subprocess.run(
        [_build.find_compiler(), "-shared", "-fPIC", str(other), "-o", str(library)], check=True
    )
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42


def test_a_library_without_its_record_is_rebuilt(cache, tiny, counting_compiler):
    _cache.load_or_build(tiny, _name(tiny))  # built, not loaded: another process's
    (cache / f"{_name(tiny)}.json").unlink()
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert counting_compiler.compiles() == 4


def test_another_compiler_rebuilds_and_no_compiler_loads_what_is_there(
    cache, tiny, counting_compiler, monkeypatch
):
    monkeypatch.delenv("CXX")
    _cache.load_or_build(tiny, _name(tiny), _load)  # built by g++
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42  # an image without g++
    monkeypatch.setenv("CXX", str(counting_compiler.path))
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert counting_compiler.compiles() == 2  # the counting script is another compiler: rebuilt


# --- leftovers ---------------------------------------------------------------------------


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(300)
    """
)


def _hold_lock(lock: Path) -> subprocess.Popen:
    """Another process holding `lock`, as a build in progress does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_build_folders_are_removed_only_when_their_lock_is_free(cache, tiny):
    _cache.open_cache()
    building, dead = "lstm_sequence_test-aaaaaaaaaaaaaaaa", "lstm_sequence_test-bbbbbbbbbbbbbbbb"
    live = cache / f".build-{building}-abcd1234"
    stale = cache / f".build-{dead}-abcd1234"
    record = cache / f".{dead}.json.x1y2z3w4"  # a record write cut short
    for folder in (live, stale):
        folder.mkdir()
        (folder / "half.o").write_bytes(b"\0" * 10)
    record.write_text("{")
    holder = _hold_lock(cache / f"{building}.lock")
    try:
        _cache.load_or_build(tiny, _name(tiny), _load)
        assert live.exists() and not stale.exists() and not record.exists()
    finally:
        holder.kill()
        holder.wait()
    _cache.open_cache()
    assert not live.exists()  # its builder is gone


def test_other_keys_are_pruned_when_unused_for_a_month(cache, tiny):
    _cache.open_cache()
    old = cache / "lstm_sequence_test-0000000000000000.so"
    recent = cache / "lstm_sequence_test-1111111111111111.so"
    unrelated = cache / "lstm_sequence_xla-2222222222222222.so"
    for path in (old, recent, unrelated):
        path.write_bytes(b"x")
    month = time.time() - 31 * 24 * 3600
    os.utime(old, (month, month))
    os.utime(unrelated, (month, month))
    _cache.load_or_build(tiny, _name(tiny), _load)
    assert not old.exists() and recent.exists()
    assert unrelated.exists()  # another library's key: not this build's to judge
    assert _cache.prune(cache, {_name(tiny)}) == [recent]


def test_a_library_in_use_is_not_pruned_for_its_build_date(cache, tiny):
    # Built long ago, used today: its record was touched on use, its library was not.
    _cache.open_cache()
    library = cache / "lstm_sequence_test-3333333333333333.so"
    record = cache / "lstm_sequence_test-3333333333333333.json"
    library.write_bytes(b"x")
    record.write_text("{}")
    month = time.time() - 31 * 24 * 3600
    os.utime(library, (month, month))
    assert _cache.prune(cache, {_name(tiny)}, older_than_s=_cache.UNUSED_KEY_S) == []
    assert library.exists() and record.exists()
    os.utime(record, (month, month))
    assert sorted(_cache.prune(cache, {_name(tiny)}, older_than_s=_cache.UNUSED_KEY_S)) == [
        record,
        library,
    ]


def test_nothing_is_written_inside_the_package(tmp_path, monkeypatch):
    # With no usable cache the kernel falls back; it never builds next to its sources.
    from keras_lstm.kernels import _native

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(readonly / "keras_lstm"))
    if os.geteuid() == 0:  # root writes anywhere: use a path that cannot be a folder
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(tmp_path / "a-file" / "keras_lstm"))
    with pytest.raises(_cache.CacheError, match="set KERAS_LSTM_CACHE_DIR"):
        _cache.open_cache()
    package = Path(_native.__file__).parent
    assert not any(p.suffix in (".so", ".o") for p in package.rglob("*"))


KILLED_BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from keras_lstm.kernels import _build, _cache
    src = Path(sys.argv[1])
    maths = _build.Unit(src / "maths.cc", per_cpu=True)
    library = _build.Library("lstm_sequence_test", (maths,), (), (), ())
    _cache.load_or_build(library, "lstm_sequence_test-0123456789abcdef")
    """
)


def test_a_killed_build_leaves_no_compiler_running(cache, tiny, tmp_path):
    # A "compiler" that starts a long child (as g++ starts cc1plus) and waits for it.
    pid_file = tmp_path / "child.pid"
    slow = tmp_path / "slow-g++"
    slow.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --version "*) echo "slow-g++ 1.0"; exit 0;; esac\n'
        f'sleep 300 & echo $! > "{pid_file}"\nwait\n'
    )
    slow.chmod(0o755)
    env = {**os.environ, "CXX": str(slow), "KERAS_LSTM_CACHE_DIR": str(cache.parent)}
    builder = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(tiny.units[0].source.parent)], env=env
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the build never started"
        assert builder.poll() is None, "the build process ended on its own"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the compiler's child outlived the killed build"
    # The next process cleans up the killed build's folder.
    _cache.open_cache()
    assert not list(cache.glob(".build-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its parent is gone for our purpose.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(")")[-1].split()[0] != "Z"


# --- the real kernel, in fresh processes -------------------------------------------------

FIRST_CALL = textwrap.dedent(
    """
    import time
    started = time.perf_counter()
    from keras_lstm.kernels import native_available
    imported = time.perf_counter()
    print(native_available(), round(time.perf_counter() - imported, 2))
    """
)


def _quiet_env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def test_a_process_after_a_failed_build_falls_back_at_once_with_one_line(cache, failing_compiler):
    env = _quiet_env(CXX=str(failing_compiler.path), KERAS_LSTM_CACHE_DIR=str(cache.parent))
    runs = [
        subprocess.run(
            [sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    tried = failing_compiler.compiles()
    assert tried >= 2
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split()[0] == "False"
        warning = [line for line in run.stderr.splitlines() if "unavailable" in line]
        assert len(warning) == 1, run.stderr
        assert "running TensorFlow ops instead" in warning[0]
        assert "`keras-lstm build`" in warning[0]
    # The build that was tried said so when it started and when it ended; the next did not try.
    said = [line for line in runs[0].stderr.splitlines() if line.startswith("keras_lstm: build")]
    assert len(said) == 2, runs[0].stderr
    assert said[0].startswith("keras_lstm: building the native LSTM kernel for this CPU, about ")
    assert said[0].endswith(" s, once; `keras-lstm build` does it ahead")
    assert "failed after" in said[1]
    assert "keras_lstm: build" not in runs[1].stderr
    assert "an earlier build failed" in runs[1].stderr
    assert failing_compiler.compiles() == tried  # the second process compiled nothing
    assert float(runs[1].stdout.split()[1]) < 2.0


def test_doctor_says_which_path_runs_and_build_builds_ahead(monkeypatch):
    # The default cache, which the rest of the suite uses (and may have built already).
    monkeypatch.delenv("CXX", raising=False)
    command = [sys.executable, "-m", "keras_lstm.cli"]
    build = subprocess.run(
        [*command, "build"], env=_quiet_env(), capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, build.stderr
    assert "native " in build.stdout and "xla " in build.stdout
    doctor = subprocess.run(
        [*command, "doctor"], env=_quiet_env(), capture_output=True, text=True, timeout=300
    )
    assert doctor.returncode == 0, doctor.stderr
    assert "native     built:" in doctor.stdout and "digest checked" in doctor.stdout
    assert "eager/graph  native kernel\n" in doctor.stdout
    assert "jit_compile  native kernel as an XLA custom call\n" in doctor.stdout


def test_doctor_names_the_problem_when_the_cache_is_unsafe(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    doctor = subprocess.run(
        [sys.executable, "-m", "keras_lstm.cli", "doctor"],
        env=_quiet_env(KERAS_LSTM_CACHE_DIR=str(shared)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert doctor.returncode == 1
    assert f"{shared} is writable by others" in doctor.stdout
    # The routes' reason for the fallback is the cache's problem.
    fallback = "eager/graph  TensorFlow ops (tf.while_loop with its own gradient): "
    assert fallback + "the native kernel is not loaded from this cache" in doctor.stdout

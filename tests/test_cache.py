"""The kernel cache leaves alone what it did not make, tells a build in progress by its
lock, says what a failed build failed on, never stalls in silence, checks a library
before loading it, and keeps its records small.

The builds are of the two-file library of `test_native_build` (under a second);
the user's folder next to the cache is real files, checked after each operation.
"""

# ruff: noqa: F811  (the fixtures of test_native_build, imported, are arguments here)
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from test_native_build import (  # noqa: F401  (fixtures)
    Compiler,
    _load,
    _name,
    _quiet_env,
    cache,
    counting_compiler,
    needs_compiler,
    tiny,
)

from keras_lstm.kernels import _build, _cache

pytestmark = needs_compiler

MONTH = 31 * 24 * 3600


# --- nothing outside the cache's own names is removed -------------------------------------


def _user_files(home: Path) -> list[Path]:
    """A user's folder, as KERAS_LSTM_CACHE_DIR might name it: files like the cache's, old."""
    files = [
        home / ".build-tools" / "deep" / "script.sh",
        home / ".settings.json.bak",
        home / "tmp_plugin.so",
        home / "lstm_sequence_notes.txt",
        home / "lstm_sequence_results.csv",
        home / "lstm_sequence_test-0000000000000000.so",  # as earlier releases named them
        home / _cache.OWN_FOLDER / "notes.txt",
        home / _cache.OWN_FOLDER / "lstm_sequence_test_notes.txt",
        home / _cache.OWN_FOLDER / ".build-tools" / "x",
        home / _cache.OWN_FOLDER / ".lstm_sequence_test.json.bak",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    long_ago = time.time() - 2 * MONTH
    for path in [*files, *(p.parent for p in files)]:
        os.utime(path, (long_ago, long_ago))
    return files


def test_cleaning_building_and_pruning_leave_a_users_files_alone(tmp_path, monkeypatch, tiny):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    own = home / _cache.OWN_FOLDER
    own.mkdir(mode=0o700)
    (own / _cache.TAG_NAME).write_text(_cache.TAG)
    files = _user_files(home)
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(home))
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    ours = _cache.open_cache()
    assert ours == own
    # `keras-lstm build --prune`, and the pruning after a build: only the cache's names.
    stale = own / "lstm_sequence_test-1111111111111111.so"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * MONTH,) * 2)
    assert _cache.prune(ours, {_name(tiny)}) == [stale]
    assert _cache.load_or_build(tiny, _name(tiny), _load, force=True)[0] == 42
    for path in files:
        assert path.read_text() == "the user's", path


def test_the_cache_is_a_tagged_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(tmp_path / "given"))
    own = _cache.open_cache()
    assert own == tmp_path / "given" / _cache.OWN_FOLDER
    tag = (own / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55")  # bford.info/cachedir


def test_a_folder_of_the_caches_name_holding_other_files_is_not_taken_over(tmp_path, monkeypatch):
    own = tmp_path / _cache.OWN_FOLDER
    own.mkdir(mode=0o700)
    (own / ".build-mine").mkdir()
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(tmp_path))
    with pytest.raises(_cache.CacheError, match="no CACHEDIR.TAG, so it is not a keras-lstm cache"):
        _cache.open_cache()
    assert (own / ".build-mine").exists() and not (own / "CACHEDIR.TAG").exists()


# --- a build in progress is known by its lock, in any PID namespace -----------------------

IN_NAMESPACE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from keras_lstm.kernels import _build, _cache
    src = Path(sys.argv[1])
    library = _build.Library(
        "lstm_sequence_test",
        (_build.Unit(src / "maths.cc", per_cpu=True), _build.Unit(src / "glue.cc")),
        (), (), (),
    )
    print(_cache.load_or_build(library, sys.argv[2])[1]["sha256"])
    """
)


def _dead_pid() -> int:
    """A process id no process has here, which a process in another namespace may have."""
    for pid in range(20000, 32000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
    pytest.skip("no free process id found")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace (unshare --pid) needs root and util-linux's unshare",
)
def test_a_build_in_another_pid_namespace_is_left_to_finish(cache, tiny, tmp_path):
    # The builder's pid inside its namespace is one no process has out here.
    pid = _dead_pid()
    slow = Compiler(tmp_path, "slow-g++", f'sleep 3\nexec "{_build.find_compiler()}" "$@"\n')
    script = (
        f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid 2>/dev/null; "
        f'"{sys.executable}" -c "$0" "$1" "$2"; exit $?'
    )
    builder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "sh", "-c", script, IN_NAMESPACE]
        + [str(tiny.units[0].source.parent), _name(tiny)],
        env={**os.environ, "CXX": str(slow.path), "KERAS_LSTM_CACHE_DIR": str(cache.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(cache.glob(".build-*")):
        assert time.monotonic() < deadline and builder.poll() is None, builder.stderr.read()
        time.sleep(0.05)
    _cache.open_cache()  # a process out here opens the cache while that build runs
    assert list(cache.glob(".build-*")), "the build in progress was removed"
    out, err = builder.communicate(timeout=120)
    assert builder.returncode == 0, err
    assert not (cache / f"{_name(tiny)}.failed.json").exists()
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert slow.compiles() == 2  # built once, in the namespace


# --- a failure says what failed; the machine's failures are tried again ------------------


def _failing_when(tmp_path, monkeypatch, name: str, failure: str) -> Path:
    """CXX: the real compiler, but `failure` (shell) while the returned flag file exists."""
    flag = tmp_path / f"{name}.on"
    flag.write_text("")
    compiler = Compiler(
        tmp_path,
        name,
        f'if [ -e "{flag}" ]; then {failure}; fi\nexec "{_build.find_compiler()}" "$@"\n',
    )
    monkeypatch.setenv("CXX", str(compiler.path))
    return flag


@pytest.mark.parametrize(
    "failure, kind, says",
    [
        (
            'echo "{out}: No space left on device" >&2; exit 1',
            _build.NO_SPACE,
            "no space left on the disk of {cache}",
        ),
        ("kill -9 $$", _build.KILLED, "was killed on"),
    ],
    ids=["disk-full", "killed"],
)
def test_a_full_disk_or_a_killed_compiler_is_recorded_as_such_and_tried_again(
    cache, tiny, tmp_path, monkeypatch, failure, kind, says
):
    flag = _failing_when(tmp_path, monkeypatch, "flaky-g++", failure.format(out="ld"))
    with pytest.raises(_build.BuildError, match=says.format(cache=cache)) as error:
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert error.value.kind == kind and "\n" not in str(error.value)
    assert json.loads((cache / f"{_name(tiny)}.failed.json").read_text())["kind"] == kind
    flag.unlink()  # space freed, memory back
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42


def test_a_full_disk_while_installing_is_a_failure_of_the_disk(cache, tiny, monkeypatch):
    def full(path, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_cache, "_write_json", full)
    with pytest.raises(_build.BuildError, match="no space left on the disk of") as error:
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert error.value.kind == _build.NO_SPACE
    monkeypatch.undo()
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(cache.parent))
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert not list(cache.glob(".build-*"))


def test_a_compiler_failure_is_still_remembered(cache, tiny, tmp_path, monkeypatch):
    _failing_when(tmp_path, monkeypatch, "broken-g++", 'echo "error: no" >&2; exit 1')
    with pytest.raises(_build.BuildError) as error:
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert error.value.kind == _build.COMPILER
    with pytest.raises(_cache.FailedBefore):
        _cache.load_or_build(tiny, _name(tiny), _load)


# --- no silent stall ----------------------------------------------------------------------


def test_a_compiler_that_hangs_is_stopped_and_recorded(cache, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(_build.SILENCE_ENV, "1")
    hang = 'case " $* " in *" -c "*) sleep 120;; esac'  # compiles hang; --version answers
    _failing_when(tmp_path, monkeypatch, "hanging-g++", hang)
    started = time.monotonic()
    with pytest.raises(_build.BuildError, match="was stopped on .*no output and no CPU use") as e:
        _cache.load_or_build(tiny, _name(tiny), _load)
    assert time.monotonic() - started < 30
    assert e.value.kind == _build.TIMED_OUT
    with pytest.raises(_cache.FailedBefore, match="stopped"):
        _cache.load_or_build(tiny, _name(tiny), _load)  # not a stall in every process


def test_a_silent_compiler_that_computes_is_not_stopped(cache, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(_build.SILENCE_ENV, "1")
    # Three seconds of work and no output, as a compiler parsing headers.
    busy = "end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do :; done"
    _failing_when(tmp_path, monkeypatch, "busy-g++", busy)
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42


def test_a_first_use_build_says_when_it_starts_and_ends(cache, tiny, capsys):
    _cache.load_or_build(tiny, _name(tiny), _load)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(", once; `keras-lstm build` does it ahead")
    assert lines[1].startswith("keras_lstm: built lstm_sequence_test in ")
    _cache.load_or_build(tiny, _name(tiny), _load)
    _cache.load_or_build(tiny, _name(tiny), force=True)  # `keras-lstm build` says its own
    assert capsys.readouterr().err == ""


# --- a library is checked before it is loaded ---------------------------------------------


def test_a_replaced_library_with_a_matching_record_is_rebuilt_not_loaded(
    cache, tiny, tmp_path, monkeypatch
):
    monkeypatch.setitem(_cache.REQUIRED_SYMBOLS, "lstm_sequence_test", ("answer",))
    _cache.load_or_build(tiny, _name(tiny))
    marker = tmp_path / "constructor-ran"
    other = tmp_path / "other.cc"
    other.write_text(
        "#include <fcntl.h>\n"
        f'__attribute__((constructor)) static void ran() {{ creat("{marker}", 0600); }}\n'
        'extern "C" int other() { return -1; }\n'
    )
    library = cache / f"{_name(tiny)}.so"
    subprocess.run(
        [_build.find_compiler(), "-shared", "-fPIC", str(other), "-o", str(library)], check=True
    )
    record = json.loads((cache / f"{_name(tiny)}.json").read_text())
    record["sha256"] = _cache._sha256(library)  # replaced together with its record
    (cache / f"{_name(tiny)}.json").write_text(json.dumps(record))
    assert _cache.load_or_build(tiny, _name(tiny), _load)[0] == 42
    assert not marker.exists(), "the replaced library was loaded"


def test_the_symbols_are_read_from_the_file(tmp_path):
    (tmp_path / "a.cc").write_text('extern "C" int answer() { return 42; }\nint hidden;\n')
    library = tmp_path / "a.so"
    command = [_build.find_compiler(), "-shared", "-fPIC", str(tmp_path / "a.cc")]
    subprocess.run([*command, "-o", str(library)], check=True)
    assert "answer" in _cache.elf_symbols(library)
    assert _cache.missing_symbols(library, ["answer", "absent"]) == ["absent"]
    library.write_bytes(library.read_bytes()[:100])
    assert _cache.missing_symbols(library, ["answer"]) == ["answer"]  # cut short: not loaded


def test_a_library_without_the_ops_falls_back_with_one_line(cache, tiny, monkeypatch):
    from keras_lstm.kernels import _native

    monkeypatch.setattr(_native, "library", lambda: tiny)
    monkeypatch.setattr(_native, "library_name", lambda: _name(tiny))
    saved = dict(_native._state)
    _native._state.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _native.native_module() is None
    finally:
        _native._state.clear()
        _native._state.update(saved)
    messages = [str(w.message) for w in caught if "keras_lstm" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "defines no op keras_lstm_sequence" in messages[0]
    assert "running TensorFlow ops instead" in messages[0]


# --- a cache path that is a file ----------------------------------------------------------

FIRST_CALL = "from keras_lstm.kernels import native_available; print(native_available())"


def test_a_cache_path_that_is_a_file_is_one_clear_line(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("the user's")
    monkeypatch.setenv("KERAS_LSTM_CACHE_DIR", str(a_file))
    with pytest.raises(_cache.CacheError, match="CACHE_DIR is .*a-file, which is a file"):
        _cache.open_cache()
    env = _quiet_env(KERAS_LSTM_CACHE_DIR=str(a_file))
    run = subprocess.run(
        [sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.stdout.strip() == "False", run.stderr
    said = [line for line in run.stderr.splitlines() if "keras_lstm" in line]
    assert len(said) == 1 and "which is a file, not a folder" in said[0], run.stderr
    assert "Errno" not in run.stderr and "Traceback" not in run.stderr
    doctor = subprocess.run(
        [sys.executable, "-m", "keras_lstm.cli", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stderr
    cache_line = [line for line in doctor.stdout.splitlines() if line.startswith("  Cache")]
    assert len(cache_line) == 1 and "which is a file, not a folder" in cache_line[0]
    assert a_file.read_text() == "the user's"


# --- records hold bounded text ------------------------------------------------------------


def test_a_compiler_with_a_huge_version_makes_a_small_record(cache, tiny, tmp_path, monkeypatch):
    chatty = Compiler(
        tmp_path,
        "chatty-g++",
        'case " $* " in *" --version "*) head -c 2000000 /dev/zero | tr "\\0" v; exit 0;; esac\n'
        f'exec "{_build.find_compiler()}" "$@"\n',
    )
    monkeypatch.setenv("CXX", str(chatty.path))
    _, record = _cache.load_or_build(tiny, _name(tiny), _load)
    assert len(record["compiler"]) <= len(str(chatty.path)) + 2 + _build.VERSION_CHARS
    assert (cache / f"{_name(tiny)}.json").stat().st_size < 20000


def test_a_filesystem_without_file_locks_is_one_cache_error(tmp_path, monkeypatch):
    # Some NFS and Lustre mounts refuse flock: one line naming the lock and the way out.
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_cache.fcntl, "flock", no_locks)
    with pytest.raises(_cache.CacheError, match=r"cannot lock .*x\.lock.*no file locks.*"):
        with _cache._lock(tmp_path / "x.lock"):
            pass

"""The cache of built kernels: where it is, whether it is safe to load from, and what it holds.

A library is loaded into the process, so the cache is treated like ssh treats
a key file: the directory and every file loaded from it must belong to the
current user and be writable by nobody else, or nothing is loaded from it.
Each library `NAME.so` has a record `NAME.json` beside it (its SHA-256, the
compiler and CPU flags that built it, how long it took); a library whose
digest does not match its record (a truncated copy, a replaced file) is
rebuilt, never loaded. A failed build leaves `NAME.failed.json` with the
reason and the compiler's output, and later processes fall back at once
without compiling until the key changes, the compiler changes, or
`keras-lstm build` asks for a rebuild.

`NAME` is `STEM-KEY`, the key a digest of the sources, the TensorFlow
version, the flags and the CPU. The compiler belongs to the key through the
record: a library built by another compiler is rebuilt, except where no
compiler is installed (an image built ahead with `keras-lstm build`).

Environment:
    KERAS_LSTM_CACHE_DIR: the cache directory. Default
        `$XDG_CACHE_HOME/keras_lstm`, else `~/.cache/keras_lstm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from keras_lstm.kernels import _build

# A build directory left by a process that is gone, or this old, is removed.
STALE_BUILD_S = 24 * 3600
# Libraries of other keys unused this long are removed after a build.
UNUSED_KEY_S = 30 * 24 * 3600
# A library's record is touched on use at most this often (its mtime says "last used").
TOUCH_EVERY_S = 24 * 3600


class CacheError(RuntimeError):
    """The cache cannot be used: missing and not creatable, or not safe to load from."""


class FailedBefore(RuntimeError):
    """An earlier process failed to build this library; `record` holds why."""

    def __init__(self, reason: str, record: Path):
        super().__init__(reason)
        self.reason = reason
        self.record = record


def cache_dir() -> Path:
    """The cache directory this process uses (which may not exist yet)."""
    if os.environ.get("KERAS_LSTM_CACHE_DIR"):
        return Path(os.environ["KERAS_LSTM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keras_lstm"


def unsafe_reason(path: Path, *, follow: bool = False) -> str | None:
    """Why `path` is not safe to load from, or `None` if it is.

    Safe: owned by this user, writable by neither group nor others, and (for
    a file, `follow=False`) not a symbolic link.
    """
    info = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if info.st_uid != os.geteuid():
        return f"{path} belongs to user id {info.st_uid}, not to this user ({os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others (mode {stat.filemode(info.st_mode)})"
    return None


def open_cache() -> Path:
    """The cache directory, created private (0700) if missing; raises `CacheError` if unsafe."""
    directory = cache_dir()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        # A symbolic link to a directory of ours is fine (~/.cache on another disk).
        reason = unsafe_reason(directory, follow=True)
    except OSError as error:
        raise CacheError(
            f"cannot create the cache directory {directory} ({error.strerror or error}); "
            "set KERAS_LSTM_CACHE_DIR to a folder of your own"
        ) from error
    if reason:
        raise CacheError(
            f"refusing to load from the cache: {reason}; "
            "set KERAS_LSTM_CACHE_DIR to a folder only you can write"
        )
    remove_stale_builds(directory)
    return directory


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path`, opened without following a link or truncating anything."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CacheError(f"refusing to use the lock {path}: it is a symbolic link") from error
        raise CacheError(f"cannot open the lock {path} ({error.strerror})") from error
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise CacheError(f"refusing to use the lock {path}: it belongs to another user")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    """Writes `value` to `path` atomically, private to this user."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclasses.dataclass(frozen=True)
class Entry:
    """The files of one library in the cache."""

    directory: Path
    name: str  # STEM-KEY

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def record(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def failure(self) -> Path:
        return self.directory / f"{self.name}.failed.json"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.name}.lock"


def library_name(library: _build.Library, extra: str = "") -> str:
    """`STEM-KEY` for this machine: sources, flags, CPU and `extra` (the TensorFlow version).

    The sources count by name and content, not by where they are: a flag that
    names their folder (`-I.../keras_lstm/kernels`) is keyed without it, so
    that the same sources reached by another path (an installed copy and a
    checkout, `tests/../keras_lstm`) share one library instead of each
    building its own.
    """
    digest = hashlib.sha256()
    for path in (*(unit.source for unit in library.units), *library.headers):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    folders = {str(unit.source.parent) for unit in library.units}

    def keyed(flag: str) -> str:
        for folder in folders:
            flag = flag.replace(folder, "<sources>")
        return flag

    digest.update(
        "\n".join(
            [
                extra,
                " ".join(
                    keyed(flag)
                    for flag in _build.COMMON_FLAGS
                    + _build.MATHS_FLAGS
                    + _build.GLUE_FLAGS
                    + library.compile_flags
                    + library.link_flags
                ),
                " ".join(f"{s.name}={','.join(s.flags)}" for s in _build.target_flag_sets()),
                _build.cpu_identity(),
            ]
        ).encode()
    )
    return f"{library.stem}-{digest.hexdigest()[:16]}"


def verified_record(entry: Entry, compiler: str) -> dict | None:
    """The record of `entry`'s library if the library is there and matches it, else `None`.

    Raises `CacheError` if the library or its record is not safe to load
    (another user's, or writable by others): that is never rebuilt over.
    """
    try:
        reason = unsafe_reason(entry.library)
    except FileNotFoundError:
        return None
    if reason:
        raise CacheError(f"refusing to load {reason}")
    try:
        reason = unsafe_reason(entry.record)
    except FileNotFoundError:
        return None
    if reason:
        raise CacheError(f"refusing to load {entry.library.name}: its record {reason}")
    record = _read_json(entry.record)
    if record is None or record.get("sha256") != _sha256(entry.library):
        return None
    if compiler != "none" and record.get("compiler") != compiler:
        return None
    if time.time() - entry.record.stat().st_mtime > TOUCH_EVERY_S:
        with contextlib.suppress(OSError):
            os.utime(entry.record)  # "last used", for the removal of unused keys
    return record


def failed_record(entry: Entry, compiler: str) -> dict | None:
    """The failure record of `entry` that still applies (same compiler), else `None`."""
    try:
        if unsafe_reason(entry.failure):
            return None  # not ours to trust: build again, and overwrite it
    except FileNotFoundError:
        return None
    record = _read_json(entry.failure)
    if record is None or record.get("compiler") != compiler:
        return None
    return record


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(directory: Path) -> list[Path]:
    """Removes build directories of processes that are gone (or a day old), and temp files."""
    removed = []
    now = time.time()
    for path in directory.glob(".build-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            pid = -1
        with contextlib.suppress(OSError):
            old = now - path.lstat().st_mtime > STALE_BUILD_S
            if old or pid < 0 or not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    # Temporary files of an interrupted record write (and of releases before records).
    for pattern in (".*.json.*", "tmp*.so"):
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime > 60:
                    path.unlink()
                    removed.append(path)
    return removed


def other_keys(directory: Path, names: set[str]) -> list[Path]:
    """Files of libraries whose name is not in `names` (other keys, older releases)."""
    stems = {name.rsplit("-", 1)[0] for name in names}
    found = []
    for path in directory.iterdir():
        if not path.name.startswith("lstm_sequence") or path.is_dir():
            continue
        name = path.name.split(".", 1)[0]
        if name in names:
            continue
        stem = name.rsplit("-", 1)[0] if "-" in name else None
        # Releases before records named libraries lstm_sequence[_xla]_KEY.so.
        if stem in stems or stem is None:
            found.append(path)
    return found


def prune(directory: Path, keep: set[str], older_than_s: float = 0.0) -> list[Path]:
    """Removes the files of libraries other than `keep` last used over `older_than_s` ago.

    A library's last use is its newest file's time (its record is touched on
    use), so its files go together or not at all.
    """
    groups: dict[str, list[Path]] = {}
    for path in other_keys(directory, keep):
        groups.setdefault(path.name.split(".", 1)[0], []).append(path)
    removed = []
    now = time.time()
    for paths in groups.values():
        with contextlib.suppress(OSError):
            if now - max(p.lstat().st_mtime for p in paths) < older_than_s:
                continue
            for path in paths:
                path.unlink()
                removed.append(path)
    return removed


def load_or_build(library: _build.Library, name: str, load=None, force: bool = False):
    """`(load(path), record)` of library `name`, built first if missing, damaged or stale.

    With `load=None` the library is only built (or found) and checked: `(path, record)`.

    Raises `CacheError` (no safe cache), `FailedBefore` (an earlier build
    failed; not with `force`) or `_build.BuildError` (this build failed, now
    recorded). `force` builds even a library that is there and intact.
    A library that builds but does not load is recorded as failed
    too, and the error raised is `BuildError`.
    """
    directory = open_cache()
    entry = Entry(directory, name)
    compiler = _build.compiler_identity()

    def ready():
        """The verified record, `None` to build; raises `FailedBefore`. `force` builds."""
        if force:
            return None
        failure = failed_record(entry, compiler)
        if failure is not None:
            raise FailedBefore(failure.get("reason", "an earlier build failed"), entry.failure)
        return verified_record(entry, compiler)

    record = ready()
    if record is None:
        with _lock(entry.lock):
            record = ready()  # another process may have built it meanwhile
            if record is None:
                record = _build_into(library, entry, compiler)
    record = {**record, "path": str(entry.library)}
    if load is None:
        return entry.library, record
    try:
        return load(entry.library), record
    except Exception as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        reason = f"{entry.library.name} built but did not load: {first_line}"
        with _lock(entry.lock):
            _write_json(entry.failure, {"reason": reason, "compiler": compiler, "log": str(error)})
        raise _build.BuildError(reason, str(error)) from error


def _build_into(library: _build.Library, entry: Entry, compiler: str) -> dict:
    """Builds `library` and installs it as `entry` with its record; on failure records why.

    The library in place is replaced only by a finished build (one rename), so
    a failed rebuild (`keras-lstm build --force` with a broken compiler) leaves
    an intact library working, and records no failure over it.
    """
    _remove(entry.failure)
    prefix = f".build-{library.stem}-{os.getpid()}-"  # the pid: see remove_stale_builds
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=entry.directory))
    try:
        built = work / entry.library.name
        try:
            outcome = _build.build_library(library, built, work)
        except _build.BuildError as error:
            # The library in place, if its digest matches, stays (whoever built it).
            if verified_record(entry, "none") is None:
                _remove(entry.library, entry.record)
                with contextlib.suppress(OSError):
                    _write_json(
                        entry.failure,
                        {
                            "reason": error.reason,
                            "compiler": compiler,
                            "when": _now(),
                            "attempts": error.attempts,
                            "log": error.log[-20000:],
                        },
                    )
            raise
        with open(built, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(built, 0o700)
        record = {
            "library": entry.library.name,
            "sha256": _sha256(built),
            "size": built.stat().st_size,
            "built": _now(),
            **dataclasses.asdict(outcome),
        }
        # Library first, then its record: a reader between the two sees a
        # mismatch, takes the lock and finds both once this build is done.
        os.replace(built, entry.library)
        _write_json(entry.record, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prune(entry.directory, {entry.name}, older_than_s=UNUSED_KEY_S)
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

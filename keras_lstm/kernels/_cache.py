"""The cache of built kernels: where it is, whether it is safe to load from, and what it holds.

The cache is a folder of its own, `keras_lstm-kernels/`, inside the folder
the user names (`KERAS_LSTM_CACHE_DIR`, default `~/.cache/keras_lstm`),
marked with a `CACHEDIR.TAG` (https://bford.info/cachedir/) so that backup
tools skip it. The cache only ever removes, and only inside that folder,
names it makes itself: `STEM-KEY.so`, `.json`, `.failed.json` and `.lock`,
its build folders `.build-STEM-KEY-*` and the temporary files of a record
write `.STEM-KEY.json.*`. Anything else there, and everything outside it,
is left alone.

A library is loaded into the process, so the cache is treated like ssh treats
a key file: the folders and every file loaded from them must belong to the
current user and be writable by nobody else, or nothing is loaded from it.
Each library `NAME.so` has a record `NAME.json` beside it (its SHA-256, the
compiler and CPU flags that built it, how long it took); a library whose
digest does not match its record (a truncated copy, a replaced file), or
that lacks the C symbols its loader calls (read from the file, before
loading it), is rebuilt, never loaded. A failed build leaves
`NAME.failed.json` with what failed (the compiler, no space on the disk,
the compiler killed, a compile timed out), the reason and the compiler's
output. After a failure of the compiler, or a time-out, later processes fall
back at once without compiling until the key changes, the compiler changes,
or `keras-lstm build` asks for a rebuild; after a full disk or a killed
compiler the next use tries again.

A build holds the lock `NAME.lock` (`fcntl.flock`) from start to end, and
the operating system drops it when the process ends, however it ends. So a
build folder or a temporary record whose lock is free was left by a process
that is gone, and is removed; one whose lock is held is in progress, whichever
PID namespace (container) the builder runs in.

`NAME` is `STEM-KEY`, the key a digest of the sources, the TensorFlow
version, the flags and the CPU. The compiler belongs to the key through the
record: a library built by another compiler is rebuilt, except where no
compiler is installed (an image built ahead with `keras-lstm build`).

Environment:
    KERAS_LSTM_CACHE_DIR: the folder that holds the cache's own folder.
        Default `$XDG_CACHE_HOME/keras_lstm`, else `~/.cache/keras_lstm`.
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
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path

from keras_lstm.kernels import _build

# The cache's own folder inside the one the user names, and its mark.
OWN_FOLDER = "keras_lstm-kernels"
TAG_NAME = "CACHEDIR.TAG"
TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by keras-lstm (its native kernels).\n"
    "# For information about cache directory tags, see https://bford.info/cachedir/\n"
)
# Libraries of other keys unused this long are removed after a build.
UNUSED_KEY_S = 30 * 24 * 3600
# A library's record is touched on use at most this often (its mtime says "last used").
TOUCH_EVERY_S = 24 * 3600
# A record is a few kilobytes; a larger file is not one of ours, and is not read.
MAX_RECORD_BYTES = 1 << 20
# The C symbols each library must define, checked before it is loaded: those its
# loader calls (lstm_core.h, lstm_sequence_xla.cc).
REQUIRED_SYMBOLS = {
    "lstm_sequence": (
        "keras_lstm_bf16_products",
        "keras_lstm_forward_rows",
        "keras_lstm_backward_rows",
        "keras_lstm_kept_step_grads",
        "keras_lstm_order_rows",
        "keras_lstm_kept_positions",
        "keras_lstm_add_up_kept_sums",
    ),
    "lstm_sequence_xla": ("keras_lstm_xla_init",),
}
# What a build of each library is called on stderr, and about how long it takes.
ANNOUNCED = {
    "lstm_sequence": ("the native LSTM kernel for this CPU", 25),
    "lstm_sequence_xla": ("the native LSTM kernel's XLA (jit_compile) library", 40),
}

# The names the cache makes: `STEM-KEY` and a suffix; a build folder; a record's
# temporary file (`_write_json`); `mkdtemp` and `mkstemp` add 8 characters.
_NAME = r"(?P<name>[a-z0-9_]+-[0-9a-f]{16})"
_LIBRARY_FILE = re.compile(_NAME + r"\.(?:so|json|failed\.json|lock)")
_LEFTOVER = re.compile(
    r"\.build-"
    + _NAME
    + r"-[a-z0-9_]{8}|\."
    + _NAME.replace("name", "tmp")
    + r"\.(?:failed\.)?json\.[a-z0-9_]{8}"
)


class CacheError(RuntimeError):
    """The cache cannot be used: missing and not creatable, or not safe to load from."""


class FailedBefore(RuntimeError):
    """An earlier process failed to build this library; `record` holds why."""

    def __init__(self, reason: str, record: Path):
        super().__init__(reason)
        self.reason = reason
        self.record = record


def cache_dir() -> Path:
    """The folder the user names for the cache (which may not exist yet)."""
    if os.environ.get("KERAS_LSTM_CACHE_DIR"):
        return Path(os.environ["KERAS_LSTM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keras_lstm"


def kernels_dir() -> Path:
    """The cache's own folder, where it writes and removes (which may not exist yet)."""
    return cache_dir() / OWN_FOLDER


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
    """The cache's own folder, created private (0700) and tagged if missing.

    Raises `CacheError` (one line) where it cannot be created or is not safe.
    Removes what builds of processes that are gone left behind.
    """
    given = cache_dir()
    try:
        _open_given(given)
        own = _open_own(given / OWN_FOLDER)
    except OSError as error:
        raise CacheError(
            f"cannot create the cache directory {given / OWN_FOLDER} "
            f"({error.strerror or type(error).__name__}); "
            "set KERAS_LSTM_CACHE_DIR to a folder of your own"
        ) from error
    remove_stale_builds(own)
    return own


def _open_given(given: Path) -> None:
    """Creates the folder the user names if missing; raises `CacheError` if not usable."""
    given.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        given.mkdir(mode=0o700)
    if not given.is_dir():
        named = "KERAS_LSTM_CACHE_DIR" if os.environ.get("KERAS_LSTM_CACHE_DIR") else "the cache"
        raise CacheError(
            f"{named} is {given}, which is a file, not a folder; "
            "set KERAS_LSTM_CACHE_DIR to a folder of your own"
        )
    # A symbolic link to a folder of ours is fine (~/.cache on another disk).
    reason = unsafe_reason(given, follow=True)
    if reason:
        raise CacheError(
            f"refusing to load from the cache: {reason}; "
            "set KERAS_LSTM_CACHE_DIR to a folder only you can write"
        )


def _open_own(own: Path) -> Path:
    """The cache's own folder, created and tagged if missing; refused if not the cache's."""
    created = True
    try:
        own.mkdir(mode=0o700)
    except FileExistsError:
        created = False
    # Not followed: a link would let cleaning reach another folder.
    reason = unsafe_reason(own) or (None if own.is_dir() else f"{own} is not a folder")
    if reason:
        raise CacheError(
            f"refusing to use the cache: {reason}; "
            "set KERAS_LSTM_CACHE_DIR to a folder only you can write"
        )
    tag = own / TAG_NAME
    if not tag.is_file():
        # A folder of that name made by someone else: not the cache's to clean.
        if not created and any(p.name != TAG_NAME for p in own.iterdir()):
            raise CacheError(
                f"refusing to use {own}: it holds files but no {TAG_NAME}, so it is not a "
                "keras-lstm cache; move it away or set KERAS_LSTM_CACHE_DIR elsewhere"
            )
        with contextlib.suppress(FileExistsError):
            fd = os.open(tag, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(TAG)
    return own


def _open_lock(path: Path) -> int:
    """The lock file `path`, opened without following a link or truncating anything."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CacheError(f"refusing to use the lock {path}: it is a symbolic link") from error
        raise CacheError(f"cannot open the lock {path} ({error.strerror})") from error
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise CacheError(f"refusing to use the lock {path}: it belongs to another user")
    return fd


@contextlib.contextmanager
def _lock(path: Path, wait: bool = True):
    """An exclusive lock on `path`; yields whether it is held (always, with `wait`)."""
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as error:  # a filesystem without file locks (some NFS, Lustre mounts)
            raise CacheError(
                f"cannot lock {path} ({error.strerror}): the cache's filesystem has no file "
                "locks; set KERAS_LSTM_CACHE_DIR to a local folder"
            ) from error
        yield True
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    """Writes `value` to `path` atomically, private to this user.

    Called with `path`'s library lock held: a temporary file left by a process
    that died here is removed once that lock is free (`remove_stale_builds`).
    """
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
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def elf_symbols(path: Path) -> set[str]:
    """The names a 64-bit little-endian ELF file defines in its dynamic symbol table.

    Read from the file, without loading it (loading runs its constructors).
    Raises `ValueError` for a file that is not such an ELF file, or is cut short.
    """
    data = path.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError(f"{path.name} is not a 64-bit little-endian ELF file")
    try:
        (table_at,) = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        # (sh_type, sh_offset, sh_size, sh_link) of each section header.
        sections = [
            struct.unpack_from("<4xI16xQQI", data, table_at + i * entry_size) for i in range(count)
        ]
        names = set()
        for kind, offset, size, link in sections:
            if kind != 11:  # SHT_DYNSYM
                continue
            strings_at = sections[link][1]
            for at in range(offset, offset + size, 24):  # Elf64_Sym
                name_at, section = struct.unpack_from("<I2xH", data, at)
                if section != 0 and name_at:  # defined here, and named
                    end = data.index(b"\0", strings_at + name_at)
                    names.add(data[strings_at + name_at : end].decode(errors="replace"))
    except (struct.error, IndexError, ValueError) as error:
        raise ValueError(f"{path.name} is not a readable ELF file (cut short?)") from error
    return names


def missing_symbols(path: Path, symbols) -> list[str]:
    """Which of `symbols` the library `path` does not define (all, if it is not readable)."""
    try:
        defined = elf_symbols(path)
    except (OSError, ValueError):
        return list(symbols)
    return [name for name in symbols if name not in defined]


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

    @property
    def symbols(self) -> tuple[str, ...]:
        """The C symbols the library must define before it is loaded."""
        return REQUIRED_SYMBOLS.get(self.name.rsplit("-", 1)[0], ())


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


def verified_record(entry: Entry, compiler: str, symbols=None) -> dict | None:
    """The record of `entry`'s library if the library is there and matches it, else `None`.

    Matches: the digest of its record, and it defines `symbols` (default
    `entry.symbols`). Raises `CacheError` if the library or its record is not
    safe to load (another user's, or writable by others): that is never
    rebuilt over.
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
    if missing_symbols(entry.library, entry.symbols if symbols is None else symbols):
        return None
    if time.time() - entry.record.stat().st_mtime > TOUCH_EVERY_S:
        with contextlib.suppress(OSError):
            os.utime(entry.record)  # "last used", for the removal of unused keys
    return record


def failed_record(entry: Entry, compiler: str) -> dict | None:
    """The failure record of `entry` that still applies, else `None`.

    It applies with the same compiler, and unless the machine failed rather
    than the compiler (a full disk, a killed compiler): that is tried again.
    """
    try:
        if unsafe_reason(entry.failure):
            return None  # not ours to trust: build again, and overwrite it
    except FileNotFoundError:
        return None
    record = _read_json(entry.failure)
    if record is None or record.get("compiler") != compiler:
        return None
    if record.get("kind") in _build.ENVIRONMENT_KINDS:
        return None
    return record


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_builds(directory: Path) -> list[Path]:
    """Removes the build folders and temporary records of builds whose process is gone.

    Gone: nobody holds the library's lock, which a build holds from start to
    end. Only names the cache makes are considered (`_LEFTOVER`).
    """
    leftovers: dict[str, list[Path]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name)
        if match:
            leftovers.setdefault(match["name"] or match["tmp"], []).append(path)
    removed = []
    for name, paths in leftovers.items():
        with contextlib.suppress(CacheError), _lock(directory / f"{name}.lock", wait=False) as free:
            for path in paths if free else ():
                with contextlib.suppress(OSError):
                    if stat.S_ISDIR(path.lstat().st_mode):
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    removed.append(path)
    return removed


def other_keys(directory: Path, names: set[str]) -> list[Path]:
    """The cache's files of the libraries `names` name, under another key (older releases,
    other TensorFlow versions). Only names the cache makes are considered."""
    stems = {name.rsplit("-", 1)[0] for name in names}
    found = []
    for path in sorted(directory.iterdir()):
        match = _LIBRARY_FILE.fullmatch(path.name)
        if match is None or match["name"] in names:
            continue
        with contextlib.suppress(OSError):
            if match["name"].rsplit("-", 1)[0] in stems and stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return found


def prune(directory: Path, keep: set[str], older_than_s: float = 0.0) -> list[Path]:
    """Removes the files of libraries other than `keep` last used over `older_than_s` ago.

    A library's last use is its newest file's time (its record is touched on
    use), so its files go together or not at all; a library being built (its
    lock held) is kept.
    """
    groups: dict[str, list[Path]] = {}
    for path in other_keys(directory, keep):
        groups.setdefault(path.name.split(".", 1)[0], []).append(path)
    removed = []
    now = time.time()
    for name, paths in groups.items():
        with contextlib.suppress(OSError):
            if now - max(p.lstat().st_mtime for p in paths) < older_than_s:
                continue
        lock = directory / f"{name}.lock"
        with contextlib.suppress(OSError, CacheError), _lock(lock, wait=False) as free:
            for path in [p for p in paths if p != lock] if free else ():
                path.unlink()
                removed.append(path)
            if free:  # the lock last, while held: no build of it can start in between
                lock.unlink()
                removed += [lock] if lock in paths else []
    return removed


def load_or_build(library: _build.Library, name: str, load=None, force: bool = False):
    """`(load(path), record)` of library `name`, built first if missing, damaged or stale.

    With `load=None` the library is only built (or found) and checked: `(path, record)`.
    With a `load`, a build says on stderr that it starts and that it ended.

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
                build = _announced(_build_into) if load is not None else _build_into
                record = build(library, entry, compiler)
    record = {**record, "path": str(entry.library)}
    if load is None:
        return entry.library, record
    try:
        return load(entry.library), record
    except Exception as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        reason = f"{entry.library.name} built but did not load: {first_line}"
        with _lock(entry.lock):
            _write_json(
                entry.failure,
                {
                    "reason": reason,
                    "kind": "load",
                    "compiler": compiler,
                    "log": str(error)[-20000:],
                },
            )
        raise _build.BuildError(reason, str(error)) from error


def _announced(build):
    """`build` saying on stderr, one line each, that it starts and how it ended.

    A first use waits for the build (half a minute or more): it should not
    look like a hang.
    """

    def announced(library: _build.Library, entry: Entry, compiler: str) -> dict:
        what, seconds = ANNOUNCED.get(library.stem, (library.stem, 30))
        _say(
            f"keras_lstm: building {what}, about {seconds} s, once; "
            "`keras-lstm build` does it ahead"
        )
        started = time.monotonic()
        try:
            record = build(library, entry, compiler)
        except BaseException:
            _say(f"keras_lstm: building {what} failed after {time.monotonic() - started:.0f} s")
            raise
        _say(f"keras_lstm: built {what} in {time.monotonic() - started:.0f} s ({entry.directory})")
        return record

    return announced


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _build_into(library: _build.Library, entry: Entry, compiler: str) -> dict:
    """Builds `library` and installs it as `entry` with its record; on failure records why.

    Called with `entry.lock` held. The library in place is replaced only by a
    finished build (one rename), so a failed rebuild (`keras-lstm build
    --force` with a broken compiler) leaves an intact library working, and
    records no failure over it.
    """
    _remove(entry.failure)
    try:
        record = _build_checked(library, entry)
    except _build.BuildError as error:
        # The library in place, if its digest matches, stays (whoever built it).
        if verified_record(entry, "none") is None:
            _remove(entry.library, entry.record)
            with contextlib.suppress(OSError):
                _write_json(entry.failure, _failure_record(error, compiler))
        raise
    prune(entry.directory, {entry.name}, older_than_s=UNUSED_KEY_S)
    return record


def _failure_record(error: _build.BuildError, compiler: str) -> dict:
    return {
        "reason": error.reason,
        "kind": error.kind,
        "compiler": compiler,
        "when": _now(),
        "attempts": error.attempts,
        "log": error.log[-20000:],
    }


def _build_checked(library: _build.Library, entry: Entry) -> dict:
    """Builds into a private folder, checks the symbols, installs library then record.

    A full disk on the way (no room for the folder, the library or its
    record) raises a `BuildError` of kind `NO_SPACE`.
    """
    try:
        work = Path(tempfile.mkdtemp(prefix=f".build-{entry.name}-", dir=entry.directory))
        try:
            built = work / entry.library.name
            outcome = _build.build_library(library, built, work)
            missing = missing_symbols(built, entry.symbols)
            if missing:
                raise _build.BuildError(f"{built.name} was built without {', '.join(missing)}")
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
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _build.BuildError(
            f"no space left on the disk of {entry.directory} (building {entry.library.name}); "
            "the next use tries again",
            str(error),
            kind=_build.NO_SPACE,
        ) from error
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

"""Write files and folders so that a failure never leaves half of one behind.

A folder is written under a hidden name beside its destination,
`.<name>.<pid>-<random>.tmp`, and renamed into place once complete. While
it is written, the writing process holds an exclusive lock on it
(`fcntl.flock`), which the operating system drops when the process ends,
however it ends (a crash, `kill -9`). `remove_stale_temporaries` uses that
lock to tell a folder another process is still writing from one left behind
by a process that is gone.

A write that runs out of disk space (or quota) removes what it wrote and
raises `DiskFullError`, one line naming the folder, whatever raised it
(Python, or TensorFlow's writers with their own error classes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, so only the age rule applies
    fcntl = None

# A temporary folder nobody holds the lock of is removed once nothing in it
# has changed for this long. The lock is taken right after the folder is
# created; the delay only covers that moment.
STALE_AFTER_S = 60.0
# A temporary folder whose lock cannot be tested (a platform or file system
# without flock, or a folder written by a version that took no lock) is
# removed once nothing in it has changed for this long.
UNVERIFIED_STALE_AFTER_S = 24 * 3600.0

# `.<target>.<pid>-<random>.tmp` (or `.old`: the previous copy during a swap);
# older versions wrote `.<target>.<random>.tmp`, without the pid and the lock.
_TEMPORARY_NAME = re.compile(
    r"\.(?P<target>.+?)\.(?:(?P<pid>[0-9]+)-)?[A-Za-z0-9_]+\.(?P<kind>tmp|old)"
)
_HELD = object()  # `_lock`'s answer when another open file holds the lock
_MAX_RENAME_TRIES = 100
# How the system says a disk or quota is full, also inside other libraries' errors.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class DiskFullError(OSError):
    """No space was left while writing; what was written has been removed."""


def _disk_full(error: BaseException | None) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return error is not None and any(text in str(error) for text in _DISK_FULL_TEXT)


def _disk_full_error(path: str) -> DiskFullError:
    """One line (no `[Errno 28]`), with the errno still set for callers that test it."""
    folder = os.path.dirname(path)
    error = DiskFullError(
        f"no space left on the disk of `{folder}` while writing `{os.path.basename(path)}`; "
        "nothing was left there. Free some space and try again."
    )
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`.

    The temporary file lives in a private folder next to `path` (so no other
    process can take its name) and is flushed to disk before the rename,
    which is atomic on one file system: readers see either the old file or
    the whole new one. On any exception `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    tmp = os.path.join(private, os.path.basename(path))
    try:
        yield tmp  # writers such as keras.saving create the file themselves
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception as error:
        if _disk_full(error):
            raise _disk_full_error(path) from None
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


class AtomicDirectory:
    """Context manager: yield an empty temporary folder beside `path`, then move it there.

    `with AtomicDirectory(path) as tmp:` writes into `tmp`; when the block
    ends without an exception the folder is renamed to `path` (then
    `.path`, which may differ with `next_path`). On an exception, or when
    the rename is refused, the temporary folder is removed and `path` is
    left as it was.

    Args:
        path: Where the folder goes.
        overwrite: Replace an existing `path`, once the new folder is
            complete; if the swap itself fails, the old folder is put back.
            Default: `False`, an existing `path` raises `FileExistsError`,
            also one that appears while the new folder is being written: a
            folder is never replaced unless asked.
        next_path: With `overwrite=False`, called when `path` is taken by
            the time the new folder is complete (another process wrote it
            meanwhile); returns the next path to try. Default: `None`,
            raise `FileExistsError`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        overwrite: bool = False,
        next_path: Callable[[], str] | None = None,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        self.next_path = next_path
        self._tmp = None
        self._lock = None

    def __enter__(self) -> str:
        if os.path.lexists(self.path) and not self.overwrite and self.next_path is None:
            raise FileExistsError(
                f"`{self.path}` already exists; pass overwrite=True to replace it."
            )
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self._tmp, self._lock = _locked_temporary(parent, os.path.basename(self.path), ".tmp")
        return self._tmp

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            if exc_type is None:
                self._move_into_place()
        except Exception as error:
            if _disk_full(error):
                raise _disk_full_error(self.path) from None
            raise
        finally:
            if os.path.exists(self._tmp):
                shutil.rmtree(self._tmp, ignore_errors=True)
            _unlock(self._lock)
        if _disk_full(exc):  # the writer's own error, often pages long: one line instead
            raise _disk_full_error(self.path) from None
        return False

    def _move_into_place(self) -> None:
        if self.overwrite and os.path.lexists(self.path):
            self._swap()
            return
        for _ in range(_MAX_RENAME_TRIES):
            if _rename_unless_taken(self._tmp, self.path):
                return
            if self.overwrite:
                self._swap()
                return
            if self.next_path is None:
                raise FileExistsError(
                    f"`{self.path}` was created by someone else while this folder was being "
                    "written; it was left as it is. Pass overwrite=True to replace it."
                )
            self.path = os.path.abspath(self.next_path())
        raise FileExistsError(f"No free name found next to `{self.path}`.")

    def _swap(self) -> None:
        parent = os.path.dirname(self.path)
        old, old_lock = _locked_temporary(parent, os.path.basename(self.path), ".old")
        try:
            previous = os.path.join(old, "previous")
            os.replace(self.path, previous)
            try:
                os.replace(self._tmp, self.path)
            except BaseException:
                os.replace(previous, self.path)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
            _unlock(old_lock)


def atomic_directory(
    path: str | os.PathLike,
    overwrite: bool = False,
    next_path: Callable[[], str] | None = None,
) -> AtomicDirectory:
    """`AtomicDirectory(path, overwrite, next_path)`: see there."""
    return AtomicDirectory(path, overwrite=overwrite, next_path=next_path)


def remove_stale_temporaries(folder: str | os.PathLike, targets: str = ".+") -> list[str]:
    """Remove the temporary folders that interrupted writes left in `folder`.

    Only hidden folders named as `AtomicDirectory` names them, for a
    destination whose name matches the regular expression `targets`, are
    considered. One is stale, and removed, when

    - no process holds its lock and nothing in it has changed for
      `STALE_AFTER_S` seconds: its writer is gone;
    - its lock cannot be tested (no flock on this platform or file system,
      or a folder from a version without locks) and nothing in it has
      changed for `UNVERIFIED_STALE_AFTER_S` seconds.

    A folder whose lock is held, by this or any other process, is never
    removed, however old. An `.old` folder (the previous copy during a swap)
    is kept while its destination is missing, since it then holds the only
    copy. Folders that cannot be read or removed are skipped.

    Returns:
        The names of the folders removed.
    """
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in sorted(names):
        match = _TEMPORARY_NAME.fullmatch(name)
        if match is None or not re.fullmatch(targets, match["target"]):
            continue
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        if match["kind"] == "old" and not os.path.lexists(os.path.join(folder, match["target"])):
            continue
        lock = _lock(path) if match["pid"] else None
        if lock is _HELD:
            continue
        try:
            limit = STALE_AFTER_S if lock is not None else UNVERIFIED_STALE_AFTER_S
            try:
                if now - _newest_change(path) < limit:
                    continue
            except OSError:  # removed meanwhile, or unreadable
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(name)
        finally:
            _unlock(lock)
    return removed


def _locked_temporary(parent: str, name: str, suffix: str):
    """A new hidden folder `.<name>.<pid>-<random><suffix>` in `parent`, and its lock.

    `mkdtemp` makes it private (0700); it becomes the published folder, which
    a model server running as another user must read, so it gets the mode
    any new folder gets here (0777 less the umask), as `os.makedirs` would.
    """
    path = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}-", suffix=suffix, dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    lock = _lock(path)
    return path, None if lock is _HELD else lock


def _umask() -> int:
    """This process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def _lock(path: str):
    """Take an exclusive lock on the folder `path` without waiting.

    Returns the open descriptor that holds it, `_HELD` when another open
    file (in this process or another) holds it, or `None` where this
    platform or file system cannot lock a folder.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _HELD
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(lock) -> None:
    if isinstance(lock, int):
        with contextlib.suppress(OSError):
            os.close(lock)


def _rename_unless_taken(src: str, dst: str) -> bool:
    """Rename `src` to `dst` unless `dst` exists; False if it does."""
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)  # refuses a non-empty folder, or any `dst` on Windows
    except OSError:
        if os.path.lexists(dst):
            return False
        raise
    return True


def _newest_change(path: str) -> float:
    """The latest modification time of `path` and everything under it."""
    newest = os.lstat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Write files and folders so that a failure never leaves half of one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


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
    finally:
        shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temporary folder beside `path`; on success move it to `path`.

    An existing `path` is replaced only with `overwrite=True`, and then only
    once the new folder is complete. If the swap itself fails, the old folder
    is put back.
    """
    path = os.fspath(os.path.abspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"`{path}` already exists; pass overwrite=True to replace it.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if not os.path.exists(path):
            os.replace(tmp, path)
            return
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
        previous = os.path.join(old, "previous")
        os.replace(path, previous)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(previous, path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Saves and exports are all or nothing."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from keras_lstm import _atomic


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.keras"
    target.write_text("old")
    with pytest.raises(RuntimeError), _atomic.atomic_file(target) as tmp:
        assert os.path.basename(tmp) == "model.keras"  # writers that check the suffix accept it
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.keras"]

    with _atomic.atomic_file(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["model.keras"]


def test_atomic_directory_refuses_to_overwrite_unless_asked(tmp_path):
    (tmp_path / "1").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        with _atomic.atomic_directory(tmp_path / "1"):
            pass


def test_atomic_directory_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    version = tmp_path / "1"
    version.mkdir()
    (version / "saved_model.pb").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(version) and ".tmp" in str(src):
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        with _atomic.atomic_directory(version, overwrite=True) as tmp:
            with open(os.path.join(tmp, "saved_model.pb"), "w") as f:
                f.write("new")
    assert (version / "saved_model.pb").read_text() == "old"
    assert os.listdir(tmp_path) == ["1"]

    monkeypatch.setattr(_atomic.os, "replace", real_replace)
    with _atomic.atomic_directory(version, overwrite=True) as tmp:
        with open(os.path.join(tmp, "saved_model.pb"), "w") as f:
            f.write("new")
    assert (version / "saved_model.pb").read_text() == "new" and os.listdir(tmp_path) == ["1"]


def test_atomic_directory_never_replaces_a_folder_that_appears_while_it_writes(tmp_path):
    version = tmp_path / "1"
    with pytest.raises(FileExistsError, match="was created by someone else"):
        with _atomic.atomic_directory(version) as tmp:
            with open(os.path.join(tmp, "saved_model.pb"), "w") as f:
                f.write("ours")
            version.mkdir()  # another writer takes the name meanwhile
            (version / "saved_model.pb").write_text("theirs")
    assert (version / "saved_model.pb").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["1"]


def test_atomic_directory_moves_on_to_the_next_path_when_its_own_is_taken(tmp_path):
    writer = _atomic.atomic_directory(tmp_path / "1", next_path=lambda: str(tmp_path / "2"))
    with writer as tmp:
        (tmp_path / "1").mkdir()
        (tmp_path / "1" / "theirs").write_text("x")
        with open(os.path.join(tmp, "ours"), "w") as f:
            f.write("x")
    assert writer.path == str(tmp_path / "2")
    assert os.listdir(tmp_path / "1") == ["theirs"] and os.listdir(tmp_path / "2") == ["ours"]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


# A process that starts writing `<folder>/<name>` with atomic_directory and then
# either dies at once (SIGKILL: no cleanup runs) or waits, holding its folder,
# until its stdin closes. _atomic.py is loaded by path, without TensorFlow.
WRITER = r"""
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("_atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_directory(os.path.join(sys.argv[2], sys.argv[3])) as tmp:
    with open(os.path.join(tmp, "variables.data"), "w") as f:
        f.write("half of it")
    print(tmp, flush=True)
    if sys.argv[4] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


def start_writer(folder, name, then):
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, _atomic.__file__, str(folder), name, then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().strip()


def age(path, seconds):
    """Set the modification times of `path` and all it holds `seconds` into the past."""
    past = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (past, past))
    os.utime(path, (past, past))


@pytest.mark.skipif(_atomic.fcntl is None, reason="folder locks need fcntl.flock")
def test_stale_temporaries_of_a_killed_writer_are_removed_but_not_a_live_writers(tmp_path):
    killed, killed_tmp = start_writer(tmp_path, "1", "die")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    live, live_tmp = start_writer(tmp_path, "2", "wait")
    try:
        assert os.path.isdir(killed_tmp) and os.path.isdir(live_tmp)
        assert re.fullmatch(r"\.1\.[0-9]+-\w+\.tmp", os.path.basename(killed_tmp))
        # Changed just now: kept for a while, even though its writer is gone.
        assert _atomic.remove_stale_temporaries(tmp_path) == []
        age(killed_tmp, 2 * _atomic.STALE_AFTER_S)
        age(live_tmp, 10 * _atomic.UNVERIFIED_STALE_AFTER_S)  # old, but its writer is alive
        assert _atomic.remove_stale_temporaries(tmp_path) == [os.path.basename(killed_tmp)]
        assert not os.path.exists(killed_tmp) and os.path.isdir(live_tmp)
    finally:
        live.communicate("", timeout=60)
    assert live.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["2"]  # the live writer finished its folder


def test_stale_temporaries_without_a_lock_are_removed_only_when_old(tmp_path):
    for name in (".3.k2j4h5l6.tmp", ".4.a1b2c3d4.tmp", ".7.99-a1b2c3d4.old", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    age(tmp_path / ".3.k2j4h5l6.tmp", 2 * _atomic.UNVERIFIED_STALE_AFTER_S)
    age(tmp_path / ".4.a1b2c3d4.tmp", 2 * _atomic.STALE_AFTER_S)  # may still be written
    age(tmp_path / ".7.99-a1b2c3d4.old", 2 * _atomic.UNVERIFIED_STALE_AFTER_S)
    age(tmp_path / ".ipynb_checkpoints", 2 * _atomic.UNVERIFIED_STALE_AFTER_S)
    assert _atomic.remove_stale_temporaries(tmp_path, targets=r"[0-9]+") == [".3.k2j4h5l6.tmp"]
    # An `.old` folder whose version is missing holds the only copy of that version.
    assert sorted(os.listdir(tmp_path)) == [
        ".4.a1b2c3d4.tmp",
        ".7.99-a1b2c3d4.old",
        ".ipynb_checkpoints",
    ]

"""Saves and exports are all or nothing."""

import os

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

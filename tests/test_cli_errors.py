"""`keras-lstm` on damaged or wrong inputs: one line saying what is wrong, exit status 1.

Each command is run through `cli.main`; `serve-check` starts its own Python
process, whose output `capfd` collects. TensorFlow's own start-up lines may
come before ours on stderr; the lines that start with the command's name are
the report, and no traceback may appear.
"""

import errno
import os
import shutil
import subprocess
import zipfile

import keras
import pytest

from keras_lstm import GatedLSTM, cli, demo, export_for_serving

WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")


def tiny_model():
    return keras.Sequential([keras.Input((5, 2)), GatedLSTM(3), keras.layers.Dense(1)])


def report(err, command):
    """Our lines on stderr, after checking that nothing else of ours (a traceback) is there."""
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith(f"keras-lstm {command}: ")]


# ------------------------------------------------------------ serve-check


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A healthy export, version 1 of `<tmp>/model`, with its warmup requests."""
    base_dir = tmp_path_factory.mktemp("healthy") / "model"
    export_for_serving(tiny_model(), base_dir, jit_compile=False)
    return base_dir


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty_folder(version):
    shutil.rmtree(version)
    version.mkdir()


def no_variables(version):
    shutil.rmtree(version / "variables")


def corrupt_warmup(version):
    data = (version / WARMUP).read_bytes()
    (version / WARMUP).write_bytes(b"not a TFRecord" + data[14:])


DAMAGES = {
    "truncated saved_model.pb": (
        lambda version: cut_in_half(version / "saved_model.pb"),
        "`{version}/saved_model.pb` is truncated or damaged: it does not parse as a SavedModel.",
    ),
    "empty version folder": (
        empty_folder,
        "version folder `{version}` is empty; a SavedModel needs saved_model.pb and variables/.",
    ),
    "no variables folder": (
        no_variables,
        "`{version}` has no variables/ folder (the model's weights).",
    ),
    "corrupt warmup records": (
        corrupt_warmup,
        "`{version}/" + WARMUP + "` is damaged: record 1 is not a readable TFRecord",
    ),
    "warmup records cut short": (
        lambda version: cut_in_half(version / WARMUP),
        "`{version}/" + WARMUP + "` is damaged: record ",
    ),
}


# Three of the five in the default suite (each loads a SavedModel); all in the slow one.
SLOW_DAMAGES = {"empty version folder", "warmup records cut short"}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(name, marks=(pytest.mark.slow,) if name in SLOW_DAMAGES else ())
        for name in DAMAGES
    ],
)
def test_serve_check_names_what_is_damaged_in_one_line(healthy, tmp_path, capfd, damage):
    base_dir = tmp_path / "model"
    shutil.copytree(healthy, base_dir)
    version = base_dir / "1"
    spoil, message = DAMAGES[damage]
    spoil(version)
    assert cli.main(["serve-check", str(base_dir)]) == 1
    lines = report(capfd.readouterr().err, "serve-check")
    assert len(lines) == 1, lines
    assert lines[0].startswith("keras-lstm serve-check: " + message.format(version=version))


def test_serve_check_passes_a_healthy_export_and_ignores_folders_that_are_no_version(
    healthy, tmp_path, capfd
):
    base_dir = tmp_path / "model"
    shutil.copytree(healthy, base_dir)
    # '\u0667' is the Arabic-Indic digit seven: int() reads it as 7, a server ignores it.
    for name in ("\u00b2", "\u0667", "tmp", ".ipynb_checkpoints", ".2.abcd1234.tmp"):
        (base_dir / name).mkdir()
    assert cli.main(["serve-check", str(base_dir)]) == 0
    captured = capfd.readouterr()
    assert report(captured.err, "serve-check") == []
    assert f"Loading {base_dir / '1'}" in captured.out
    assert "warmup: 6 requests answered" in captured.out and captured.out.strip().endswith("OK")


def test_serve_check_without_a_numbered_folder_ignores_lookalikes(tmp_path, capfd):
    for name in ("\u00b2", "\u0663"):  # str.isdigit() is True for both; int() refuses '²'
        (tmp_path / name).mkdir()
    assert cli.main(["serve-check", str(tmp_path)]) == 1
    lines = report(capfd.readouterr().err, "serve-check")
    assert lines == [
        f"keras-lstm serve-check: `{tmp_path}` holds no numbered version folder (a name made "
        "of digits, such as 1)."
    ]


# ------------------------------------------------------ export: the .keras file


@pytest.fixture(scope="module")
def saved_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model.keras"
    tiny_model().save(path)
    return path


def text_file(path, saved):
    path.write_text("Notes for Monday: retrain the forecaster.\n")


def first_half(path, saved):
    data = saved.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zip_without_a_model(path, saved):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


def flipped_bytes(path, saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        weights = archive.getinfo("model.weights.h5")
    middle = weights.header_offset + 200
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


BAD_FILES = {
    "notes.keras": (text_file, "`{path}` is not a Keras archive (not a zip file)."),
    "half.keras": (first_half, "`{path}` is truncated or damaged: a zip file cut short."),
    "other.keras": (
        zip_without_a_model,
        "`{path}` is a zip file but not a Keras archive (no config.json inside).",
    ),
    "flipped.keras": (
        flipped_bytes,
        "`{path}` is damaged: `model.weights.h5` inside it fails its checksum.",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_export_of_a_file_that_is_not_a_model_says_what_it_is(
    saved_model_file, tmp_path, capsys, name
):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    make(path, saved_model_file)
    assert cli.main(["export", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["keras-lstm export: " + message.format(path=path)]
    assert not os.path.exists(tmp_path / "out")


def test_load_model_reads_a_healthy_file(saved_model_file):
    model = cli.load_model(saved_model_file)
    assert model.layers[0].__class__ is GatedLSTM


def test_export_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    (tmp_path / "model.keras").mkdir()
    assert cli.main(["export", str(tmp_path / "model.keras"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"keras-lstm export: `{tmp_path / 'model.keras'}` is a folder; expected a model file "
        "saved with model.save('name.keras')."
    ]


# ------------------------------------------------------------ demo --out


@pytest.fixture
def no_training(monkeypatch):
    """Make any training (or data loading) fail loudly: these checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started before checking --out")

    monkeypatch.setattr(demo, "seattle_hourly_temperatures", refuse)
    monkeypatch.setattr(demo, "_fit", refuse)


def test_demo_out_that_is_a_file_fails_before_training(tmp_path, capsys, no_training):
    out = tmp_path / "results.txt"
    out.write_text("x")
    assert cli.main(["demo", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"keras-lstm demo: `--out` must be a folder, but `{out}` is a file."
    ]


def test_demo_out_under_a_file_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "results.txt").write_text("x")
    out = tmp_path / "results.txt" / "demo" / "run1"
    assert cli.main(["demo", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"keras-lstm demo: `--out` folder `{out}` cannot be created: "
        f"`{tmp_path / 'results.txt'}` is a file, not a folder."
    ]


def test_demo_out_holding_a_folder_where_a_file_goes_fails_before_training(
    tmp_path, capsys, no_training
):
    (tmp_path / "model.keras").mkdir()
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"keras-lstm demo: `--out`: `{tmp_path / 'model.keras'}` is a folder, where the demo "
        "writes a file."
    ]


def test_demo_run_checks_out_before_training(tmp_path, no_training):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^`out` must be a folder, but `.*file` is a file\.$"):
        demo.run(out=str(tmp_path / "file"))


# ------------------------------------------------------ export: versions and full disks


def test_export_refuses_a_version_beyond_int64_naming_it(saved_model_file, tmp_path, capsys):
    base_dir = tmp_path / "model"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(saved_model_file), str(base_dir), "--version", str(2**63)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "argument --version: expected a positive integer up to 9223372036854775807" in err
    assert not base_dir.exists()
    with pytest.raises(ValueError, match="`version` must be at most 9223372036854775807"):
        export_for_serving(tiny_model(), base_dir, version=2**63)
    assert not base_dir.exists()


def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(
    saved_model_file, tmp_path, capsys, monkeypatch
):
    from keras_lstm.serving import _warmup

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_warmup, "write_warmup", no_space)
    base_dir = tmp_path / "model"
    assert cli.main(["export", str(saved_model_file), str(base_dir), "--no-jit"]) == 1
    lines = report(capsys.readouterr().err, "export")
    assert lines == [
        f"keras-lstm export: no space left on the disk of `{base_dir}` while writing `1`; "
        "nothing was left there. Free some space and try again."
    ]
    assert not base_dir.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1 MiB tmpfs with about 100 KiB free (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        (disk / "filler").write_bytes(b"\0" * (1024 - 100) * 1024)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_export_to_a_real_full_disk_is_one_line_and_leaves_nothing(
    saved_model_file, small_disk, capsys
):
    base_dir = small_disk / "model"
    assert cli.main(["export", str(saved_model_file), str(base_dir), "--no-jit"]) == 1
    lines = report(capsys.readouterr().err, "export")
    assert len(lines) == 1 and f"no space left on the disk of `{base_dir}`" in lines[0], lines
    assert sorted(os.listdir(small_disk)) == ["filler"]


# ------------------------------------------------------ serve-check: every dtype


def test_serve_check_feeds_a_string_input_a_string(tmp_path, capfd):
    import tensorflow as tf

    class Tagger(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="word"),
                tf.TensorSpec([None, None, 2], tf.float32, name="x"),
                tf.TensorSpec([], tf.bool, name="flag"),
            ]
        )
        def serve(self, word, x, flag):
            length = tf.cast(tf.strings.length(word), tf.float32)
            return {"y": tf.reduce_sum(x, axis=[1, 2]) + length, "flag": tf.logical_not(flag)}

    tagger = Tagger()
    tf.saved_model.save(tagger, str(tmp_path / "1"), signatures={"serving_default": tagger.serve})
    assert cli.main(["serve-check", str(tmp_path)]) == 0, capfd.readouterr().err[-2000:]
    captured = capfd.readouterr()
    assert report(captured.err, "serve-check") == []
    assert "input  word: string[None]" in captured.out and captured.out.strip().endswith("OK")

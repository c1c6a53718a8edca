"""`export_for_serving`: the export loads without Keras and answers like the model.

One model is exported once per module and checked in one fresh Python process
in which importing `keras` or `keras_lstm` raises ImportError, the way a model
server sees it. References are `model.predict` on whole sequences.
"""

import json
import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lstm import GatedLSTM, GatedLSTMCell, export_for_serving
from keras_lstm.serving import _graph as serving_graph
from keras_lstm.serving import _warmup as serving_warmup

# Installed before `import tensorflow` in the checking process. TensorFlow
# probes for Keras with importlib.util.find_spec, so the finder answers with
# a spec that has no origin and fails only when the module is created.
NO_KERAS = r"""
import importlib.machinery, sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "keras_lstm"):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError("blocked: " + spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Blocked())
"""

CHECKER = r"""
import json
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

def blocked(name):
    try:
        __import__(name)
    except ImportError:
        return True
    return False

cases = json.load(open(sys.argv[1]))
report = {"keras_blocked": blocked("keras") and blocked("keras_lstm"), "cases": []}
for case in cases:
    loaded = tf.saved_model.load(case["export_dir"])
    data = np.load(case["data"])
    result = {"signatures": sorted(loaded.signatures), "whole": [], "step": [], "initial": []}
    name = case["input"]
    for i in range(case["count"]):
        x = data[f"x{i}"]
        expected = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"y{i}/")}
        got = loaded.signatures["serving_default"](**{name: tf.constant(x)})
        result["whole"].append(
            {k: float(np.abs(got[k].numpy() - v).max()) for k, v in expected.items()}
        )
        if "step" not in loaded.signatures:
            continue
        batch, steps = x.shape[:2]
        states = loaded.signatures["initial_state"](batch_size=tf.constant(batch, tf.int32))
        result["initial"].append(
            {k: [list(v.shape), float(np.abs(v.numpy()).max())] for k, v in states.items()}
        )
        errors = {k: 0.0 for k in expected}
        for t in range(steps):
            out = loaded.signatures["step"](**{name: tf.constant(x[:, t])}, **states)
            states = {k: out[k] for k in states}
            for k, v in expected.items():
                if v.ndim == out[k].shape.rank + 1:  # an output per time step
                    errors[k] = max(errors[k], float(np.abs(out[k].numpy() - v[:, t]).max()))
                elif t == steps - 1:  # the output at the end of the sequence
                    errors[k] = max(errors[k], float(np.abs(out[k].numpy() - v).max()))
        result["step"].append(errors)
    warmup = os.path.join(case["export_dir"], "assets.extra", "tf_serving_warmup_requests")
    answered = []
    if os.path.exists(warmup):
        for record in tf.data.TFRecordDataset(warmup):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            request = log.predict_log.request
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
            finite = all(bool(np.isfinite(v.numpy()).all()) for v in outputs.values())
            answered.append([request.model_spec.signature_name, sorted(inputs), finite])
    result["warmup"] = answered
    report["cases"].append(result)
json.dump(report, open(sys.argv[2], "w"))
"""


def run_without_keras(cases, folder):
    """Check exports in one fresh process that cannot import Keras; return its report."""
    cases_path, report_path = os.path.join(folder, "cases.json"), os.path.join(folder, "r.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            NO_KERAS + "import os, sys\n" + CHECKER,
            cases_path,
            report_path,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(report_path) as f:
        return json.load(f)


def sequences(shapes, features, masked=False, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for batch, steps in shapes:
        x = rng.standard_normal((batch, steps, features)).astype("float32")
        if masked:
            x[0, -2:] = 0.0  # trailing padding
            x[-1, 1] = 0.0  # a gap inside the sequence
        batches.append(x)
    return batches


def make_case(model, export_dir, folder, batches, tag):
    """Save inputs and `model.predict` outputs for the checking process."""
    arrays = {}
    names = serving_graph.output_names(model)
    for i, x in enumerate(batches):
        arrays[f"x{i}"] = x
        outputs = keras.tree.flatten(model.predict(x, verbose=0))
        for name, y in zip(names, outputs, strict=True):
            arrays[f"y{i}/{name}"] = y
    data = os.path.join(folder, f"{tag}.npz")
    np.savez(data, **arrays)
    input_name = model.inputs[0]._keras_history.operation.name
    return {"export_dir": export_dir, "data": data, "input": input_name, "count": len(batches)}


def two_output_model():
    """Masked input, a per-step output and an end-of-sequence output, two recurrent layers."""
    inputs = keras.Input((None, 3), name="readings")
    x = keras.layers.Masking()(inputs)
    seq = GatedLSTM(5, return_sequences=True, name="lower")(x)
    per_step = keras.layers.Dense(2, name="per_step")(seq)
    last = keras.layers.RNN(GatedLSTMCell(4), name="upper")(seq)
    forecast = keras.layers.Dense(1, name="forecast")(keras.layers.Dropout(0.3)(last))
    return keras.Model(inputs, [per_step, forecast])


SHAPES = [(2, 4), (3, 7)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(7)
    folder = str(tmp_path_factory.mktemp("serving"))
    model = two_output_model()
    base_dir = os.path.join(folder, "models", "forecaster")
    export_dir = export_for_serving(model, base_dir)
    case = make_case(model, export_dir, folder, sequences(SHAPES, 3, masked=True), "two")
    report = run_without_keras([case], folder)
    return {
        "model": model,
        "base_dir": base_dir,
        "export_dir": export_dir,
        "case": case,
        "report": report,
        "result": report["cases"][0],
    }


def test_export_writes_the_tf_serving_layout_as_version_1(exported):
    export_dir = exported["export_dir"]
    assert export_dir == os.path.join(exported["base_dir"], "1")
    assert os.path.isfile(os.path.join(export_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(export_dir, "variables"))
    assert os.path.isfile(os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests"))
    assert sorted(os.listdir(exported["base_dir"])) == ["1"]  # no temporary folder left


def test_export_loads_in_a_process_where_keras_cannot_be_imported(exported):
    assert exported["report"]["keras_blocked"]
    assert exported["result"]["signatures"] == ["initial_state", "serving_default", "step"]


def test_serving_default_equals_model_predict_for_two_batch_sizes_and_lengths(exported):
    errors = exported["result"]["whole"]
    assert len(errors) == len(SHAPES)
    for per_output in errors:
        assert set(per_output) == {"per_step", "forecast"}
        assert max(per_output.values()) < 1e-5, per_output


def test_step_by_step_stream_equals_the_whole_sequence(exported):
    errors = exported["result"]["step"]
    assert len(errors) == len(SHAPES)
    for per_output in errors:
        assert max(per_output.values()) < 1e-5, per_output


def test_initial_state_gives_zero_states_named_after_the_layers(exported):
    for (batch, _), states in zip(SHAPES, exported["result"]["initial"], strict=True):
        assert states == {
            "lower_h": [[batch, 5], 0.0],
            "lower_c": [[batch, 5], 0.0],
            "upper_h": [[batch, 4], 0.0],
            "upper_c": [[batch, 4], 0.0],
        }


def test_warmup_records_parse_and_the_loaded_model_answers_them(exported):
    answered = exported["result"]["warmup"]
    signatures = {name for name, _, _ in answered}
    assert signatures == {"serving_default", "step", "initial_state"}
    assert len(answered) == 6
    assert all(finite for _, _, finite in answered)
    assert ["step", ["lower_c", "lower_h", "readings", "upper_c", "upper_h"], True] in answered


def test_signatures_are_compiled_with_xla(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    with open(os.path.join(exported["export_dir"], "saved_model.pb"), "rb") as f:
        saved = saved_model_pb2.SavedModel.FromString(f.read())
    compiled = {
        fn.signature.name.split("_")[3]
        for fn in saved.meta_graphs[0].graph_def.library.function
        if fn.attr["_XlaMustCompile"].b
    }
    assert {"serve", "step", "initial"} <= compiled


def test_saved_model_cli_lists_signatures_and_runs_serving_default(exported, tmp_path):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    shown = subprocess.run(
        [cli, "show", "--dir", exported["export_dir"], "--all"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    for name in ("serving_default", "step", "initial_state"):
        assert f"signature_def['{name}']" in shown
    assert "inputs['lower_h']" in shown and "outputs['forecast']" in shown

    x = np.random.default_rng(3).standard_normal((2, 5, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [
            cli,
            "run",
            "--dir",
            exported["export_dir"],
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"readings={tmp_path / 'x.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    per_step, forecast = exported["model"].predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "forecast.npy"), forecast, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "per_step.npy"), per_step, atol=1e-5)


def test_next_export_without_version_gets_the_next_number(exported, tmp_path):
    base_dir = tmp_path / "m"
    os.makedirs(base_dir / "3")
    os.makedirs(base_dir / ".7.tmp")  # not a version
    model = keras.Sequential([keras.Input((None, 2)), GatedLSTM(3)])
    path = export_for_serving(model, base_dir, jit_compile=False, streaming=False, warmup=False)
    assert path == str(base_dir / "4")


def quick_export(model, base_dir, **kwargs):
    return export_for_serving(
        model, base_dir, jit_compile=False, streaming=False, warmup=False, **kwargs
    )


@pytest.mark.parametrize("name", ["\u00b2", "\u0667", "tmp", ".ipynb_checkpoints", "x9"])
def test_folders_not_named_by_ascii_digits_are_not_versions(tmp_path, name):
    # '²' and the Arabic-Indic digit seven pass str.isdigit (int() even reads the
    # seven as 7), but TensorFlow Serving reads names of ASCII digits only.
    os.makedirs(tmp_path / "3")
    os.makedirs(tmp_path / name)
    path = quick_export(keras.Sequential([keras.Input((None, 2)), GatedLSTM(3)]), tmp_path)
    assert path == str(tmp_path / "4")
    assert sorted(os.listdir(tmp_path)) == sorted(["3", "4", name])


def test_export_removes_what_a_killed_export_left_but_not_other_hidden_folders(tmp_path):
    import signal
    import time

    from keras_lstm import _atomic

    # An export killed while writing version 2 (SIGKILL: no cleanup ran).
    writer = (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('_atomic', sys.argv[1])\n"
        "atomic = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(atomic)\n"
        "with atomic.atomic_directory(sys.argv[2]) as tmp:\n"
        "    open(os.path.join(tmp, 'saved_model.pb'), 'w').write('half')\n"
        "    print(tmp, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", writer, _atomic.__file__, str(tmp_path / "2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftover = done.stdout.strip()
    assert os.path.isdir(leftover) and os.path.dirname(leftover) == str(tmp_path)
    os.makedirs(tmp_path / ".ipynb_checkpoints")
    past = time.time() - 3600
    for path in (leftover, os.path.join(leftover, "saved_model.pb")):
        os.utime(path, (past, past))

    path = quick_export(keras.Sequential([keras.Input((None, 2)), GatedLSTM(3)]), tmp_path)
    assert path == str(tmp_path / "1")
    assert sorted(os.listdir(tmp_path)) == [".ipynb_checkpoints", "1"]


def test_default_export_takes_the_next_number_when_another_export_takes_its_own(
    tmp_path, monkeypatch
):
    # Two exports without a version both pick version 1; the other one finishes
    # first. The default must never replace a version: this one becomes 2.
    real_write_warmup = serving_warmup.write_warmup

    def other_export_finishes_first(export_dir, *args, **kwargs):
        os.makedirs(tmp_path / "1" / "variables")
        (tmp_path / "1" / "saved_model.pb").write_bytes(b"the other export")
        return real_write_warmup(export_dir, *args, **kwargs)

    monkeypatch.setattr(serving_warmup, "write_warmup", other_export_finishes_first)
    path = export_for_serving(small_model(), tmp_path, jit_compile=False)
    assert path == str(tmp_path / "2")
    assert (tmp_path / "1" / "saved_model.pb").read_bytes() == b"the other export"
    assert os.path.isfile(tmp_path / "2" / "saved_model.pb")
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_overwrite_is_documented_as_unsafe_while_a_server_reads_the_version(capsys):
    from keras_lstm import cli

    doc = " ".join(export_for_serving.__doc__.split())
    assert "unsafe while a server serves or loads it" in doc
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "unsafe while a server serves or loads it" in " ".join(capsys.readouterr().out.split())


def two_input_model():
    """Two named sequence inputs of different feature sizes, joined along features."""
    a = keras.Input((None, 3), name="a")
    b = keras.Input((None, 5), name="b")
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], keras.layers.Dense(1, name="y")(GatedLSTM(4)(joined)))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_signature_refuses_inputs_of_the_wrong_feature_size(tmp_path, jit_compile):
    import tensorflow as tf

    model = two_input_model()
    path = export_for_serving(model, tmp_path, jit_compile=jit_compile, warmup=False)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 4, 3)).astype("float32")
    b = rng.standard_normal((2, 4, 5)).astype("float32")
    np.testing.assert_allclose(
        serve(a=tf.constant(a), b=tf.constant(b))["y"], model.predict([a, b], verbose=0), atol=1e-5
    )
    # Swapped by name: each has the other's feature size, and the joined
    # features would have the right size, so only a check of each input stops it.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Shape of tensor [ab] .* expected"):
        serve(a=tf.constant(b), b=tf.constant(a))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tensor a \[2,4,4\].*\[\?,\?,3\]"):
        serve(a=tf.constant(np.zeros((2, 4, 4), "float32")), b=tf.constant(b))


def test_step_refuses_states_of_the_wrong_size(exported):
    import tensorflow as tf

    step = tf.saved_model.load(exported["export_dir"]).signatures["step"]
    states = {"lower_h": 5, "lower_c": 5, "upper_h": 4, "upper_c": 4}
    inputs = {name: tf.zeros([2, size]) for name, size in states.items()}
    assert set(step(readings=tf.zeros([2, 3]), **inputs)) >= set(states)
    inputs["upper_h"] = tf.zeros([2, 5])
    with pytest.raises(tf.errors.InvalidArgumentError, match="upper_h"):
        step(readings=tf.zeros([2, 3]), **inputs)


# ----------------------------------------------------------------- errors


def tree_of(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return sorted(found)


def small_model():
    return keras.Sequential([keras.Input((None, 3)), GatedLSTM(4), keras.layers.Dense(1)])


def test_failure_mid_write_leaves_base_dir_as_it_was(tmp_path, monkeypatch):
    base_dir = tmp_path / "m"
    os.makedirs(base_dir / "1" / "variables")
    (base_dir / "1" / "saved_model.pb").write_bytes(b"previous version")
    before = tree_of(base_dir)
    written = []

    def fail(export_dir, *args, **kwargs):
        written.extend(os.listdir(export_dir))  # the SavedModel is already there
        raise RuntimeError("disk full")

    monkeypatch.setattr(serving_warmup, "write_warmup", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_for_serving(small_model(), base_dir, jit_compile=False)
    assert "saved_model.pb" in written
    assert tree_of(base_dir) == before
    with pytest.raises(RuntimeError, match="disk full"):
        export_for_serving(small_model(), base_dir, version=1, overwrite=True, jit_compile=False)
    assert tree_of(base_dir) == before
    assert (base_dir / "1" / "saved_model.pb").read_bytes() == b"previous version"


def test_failure_in_a_new_base_dir_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(serving_warmup, "write_warmup", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_for_serving(small_model(), tmp_path / "new", jit_compile=False)
    assert os.listdir(tmp_path) == []


def test_existing_version_is_not_overwritten(tmp_path):
    os.makedirs(tmp_path / "2")
    (tmp_path / "2" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="Version 2 already exists.*overwrite=True"):
        export_for_serving(small_model(), tmp_path, version=2)
    assert os.listdir(tmp_path / "2") == ["keep"]


def test_unbuilt_model_is_refused():
    model = keras.Sequential([GatedLSTM(4)])
    with pytest.raises(ValueError, match="`model` is not built"):
        export_for_serving(model, "unused")


def test_unknown_feature_size_is_refused():
    inputs = keras.Input((None, None), name="anything")
    model = keras.Model(inputs, keras.layers.Activation("tanh")(inputs))
    with pytest.raises(ValueError, match="input `anything` has an unknown feature size"):
        export_for_serving(model, "unused")


def test_base_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="`base_dir` must be a folder.*is a file"):
        export_for_serving(small_model(), path)


@pytest.mark.parametrize("version", [0, -1, "3", 1.5, True])
def test_version_must_be_a_positive_integer(tmp_path, version):
    with pytest.raises(ValueError, match="`version` must be a positive integer"):
        export_for_serving(small_model(), tmp_path, version)
    assert os.listdir(tmp_path) == []


def test_streaming_must_be_true_false_or_auto(tmp_path):
    with pytest.raises(ValueError, match="`streaming` must be True, False or 'auto'"):
        export_for_serving(small_model(), tmp_path, streaming="yes")


def test_streaming_true_on_a_bidirectional_model_says_why_and_what_to_do(tmp_path):
    model = keras.Sequential(
        [keras.Input((None, 3)), keras.layers.Bidirectional(GatedLSTM(4)), keras.layers.Dense(1)]
    )
    with pytest.raises(
        ValueError,
        match=r"`bidirectional` \(Bidirectional\) may mix time steps"
        r".*Pass streaming=False",
    ):
        export_for_serving(model, tmp_path, streaming=True)
    assert os.listdir(tmp_path) == []


def test_streaming_true_on_a_conv_model_names_the_layer(tmp_path):
    model = keras.Sequential(
        [keras.Input((None, 3)), keras.layers.Conv1D(4, 3, name="conv"), GatedLSTM(4)]
    )
    with pytest.raises(ValueError, match=r"layer `conv` \(Conv1D\) may mix time steps"):
        export_for_serving(model, tmp_path, streaming=True)


def test_streaming_true_on_a_backwards_layer_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), GatedLSTM(4, go_backwards=True, name="bw")])
    with pytest.raises(ValueError, match="`bw` reads the sequence backwards"):
        export_for_serving(model, tmp_path, streaming=True)


def test_stateful_subclassed_model_is_refused_with_what_to_do(tmp_path):
    class Forecaster(keras.Model):
        def __init__(self):
            super().__init__()
            self.rnn = GatedLSTM(4, stateful=True)

        def call(self, x):
            return self.rnn(x)

    model = Forecaster()
    model(np.zeros((2, 3, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model"):
        export_for_serving(model, tmp_path)
    wrapped_input = keras.Input(batch_shape=(2, None, 3))
    wrapped = keras.Model(wrapped_input, model(wrapped_input))
    with pytest.raises(
        ValueError, match="stateful recurrent layers .* rebuild the model with stateful=False"
    ):
        export_for_serving(wrapped, tmp_path)


def test_non_model_is_refused():
    with pytest.raises(TypeError, match="`model` must be a keras.Model, got GatedLSTM"):
        export_for_serving(GatedLSTM(3), "unused")


def test_serve_check_on_a_folder_without_versions_says_so(tmp_path, capsys):
    from keras_lstm import cli

    os.makedirs(tmp_path / "not-a-version")
    assert cli.main(["serve-check", str(tmp_path)]) == 1
    assert "holds no numbered version folder" in capsys.readouterr().err
    assert cli.main(["serve-check", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_cli_export_of_a_missing_model_file_fails_in_one_line(tmp_path, capsys):
    from keras_lstm import cli

    assert cli.main(["export", str(tmp_path / "none.keras"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-lstm export: ") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_cli_export_without_the_serving_protos_says_what_to_do(tmp_path, capsys, monkeypatch):
    import builtins

    from keras_lstm import cli

    model = keras.Sequential([keras.Input((4, 2)), GatedLSTM(3)])
    model.save(tmp_path / "m.keras")
    real_import = builtins.__import__

    def without_serving_api(name, *args, **kwargs):
        if name.startswith("tensorflow_serving"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_serving_api)
    assert cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "tensorflow-serving-api" in err and "--no-warmup" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out")

    assert (
        cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "out"), "--no-warmup"]) == 0
    )
    assert os.path.exists(tmp_path / "out" / "1" / "saved_model.pb")
    assert not os.path.exists(tmp_path / "out" / "1" / "assets.extra")


def test_version_folder_is_readable_by_a_server_running_as_another_user(tmp_path):
    # The folder is written privately, then published with the mode a new folder gets.
    model = keras.Sequential([keras.Input((5, 2)), GatedLSTM(3), keras.layers.Dense(1)])
    mask = os.umask(0o022)
    try:
        path = export_for_serving(model, tmp_path / "models", warmup=False, streaming=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755

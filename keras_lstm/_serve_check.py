"""Load a TensorFlow Serving export the way a model server does, and call it.

This file imports TensorFlow and NumPy only (never Keras or keras_lstm), so
that it proves an export stands on its own. `keras-lstm serve-check` runs it
in a fresh Python process (`launch`) where importing `keras` or `keras_lstm`
raises ImportError; it can also be run directly:
`python keras_lstm/_serve_check.py BASE_DIR`.

A damaged export (a cut-short `saved_model.pb`, an empty version folder, no
`variables/`, unreadable warmup records, a signature that fails) is reported
as one line per problem on stderr, `keras-lstm serve-check: <problem>`, and
the process exits with status 1; a healthy one prints its signatures and
`OK` and exits with 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# Installed first in the checking process: any import of these names fails,
# as it would in a server that has TensorFlow and no Keras.
BLOCKER = """
import importlib.machinery, sys
class _NoKeras:
    # A spec without an origin: probes such as importlib.util.find_spec see no
    # package to read, and an actual import fails in create_module.
    blocked = ("keras", "keras_lstm", "tf_keras")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ImportError(f"`{spec.name}` is not importable here: a model server has no Keras")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _NoKeras())
"""

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
PREFIX = "keras-lstm serve-check: "

# TensorFlow Serving reads a version folder's name as a base-10 int64 and
# ignores every other name. `str.isdigit` is not enough: it is True for
# '²', which `int` refuses.
_VERSION_NAME = re.compile(r"[0-9]+")
_MAX_VERSION = 2**63 - 1


def version_number(name: str) -> int | None:
    """The version a folder named `name` holds for TensorFlow Serving, or None.

    Only names made of the ASCII digits 0-9 are versions: `'12'` is 12;
    `'²'`, `'tmp'`, `'.ipynb_checkpoints'` and `'.3.tmp'` are not versions.
    """
    if _VERSION_NAME.fullmatch(name) is None:
        return None
    number = int(name)
    return number if number <= _MAX_VERSION else None


def versions(base_dir: str) -> dict[int, str]:
    """`{version: entry name}` for the numbered entries of `base_dir`."""
    found = {}
    for name in sorted(os.listdir(base_dir)):
        number = version_number(name)
        if number is not None:
            found[number] = name
    return found


def launch(base_dir: str) -> int:
    """Run `check(base_dir)` in a fresh process without Keras; return its exit code."""
    newest_version(base_dir)  # a missing or empty folder fails here, before TensorFlow starts
    code = BLOCKER + (
        f"import runpy\nrunpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')\n"
    )
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.call([sys.executable, "-I", "-c", code, os.fspath(base_dir)], env=env)


def newest_version(base_dir: str) -> str:
    """The path of the highest numbered version folder in `base_dir`."""
    if not os.path.isdir(base_dir):
        raise ValueError(f"`{base_dir}` is not a folder.")
    found = versions(base_dir)
    if not found:
        raise ValueError(
            f"`{base_dir}` holds no numbered version folder (a name made of digits, such as 1)."
        )
    return os.path.join(base_dir, found[max(found)])


def _describe(spec) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in spec.shape.as_list())
    return f"{spec.dtype.name}[{dims}]"


def _reason(error: BaseException) -> str:
    """One line saying what `error` says, without TensorFlow's wrapping."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)  # {{function_node ...}}
    skip = ("Graph execution error", "Detected at node", "<stack traces", "Stack trace", "[[")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip)]
    line = lines[0] if lines else type(error).__name__
    line = re.sub(r"\s*\[Op:[^\]]*\].*$", "", line)  # [Op:IteratorGetNext] name: ...
    return line if len(line) <= 300 else line[:297] + "..."


def problems_on_disk(export_dir: str) -> list[str]:
    """What is missing or unreadable in the version folder `export_dir`, one line each.

    Checks what a server reads before it runs anything: `saved_model.pb`
    (present, parses, has a MetaGraph tagged `serve`), `variables/` (the
    index and every data shard it names) and the warmup records.
    """
    if not os.path.isdir(export_dir):
        return [f"version `{export_dir}` is not a folder."]
    entries = os.listdir(export_dir)
    if not entries:
        return [
            f"version folder `{export_dir}` is empty; a SavedModel needs saved_model.pb "
            "and variables/."
        ]
    problems = []
    saved_model = os.path.join(export_dir, "saved_model.pb")
    if os.path.isfile(saved_model):
        problems += _saved_model_problems(saved_model)
    elif not os.path.isfile(os.path.join(export_dir, "saved_model.pbtxt")):
        problems.append(f"`{export_dir}` has no saved_model.pb (the graph and signatures).")
    problems += _variables_problems(os.path.join(export_dir, "variables"))
    warmup = os.path.join(export_dir, WARMUP_FILE)
    if os.path.exists(warmup):
        problems += _warmup_problems(warmup)
    return problems


def _saved_model_problems(path: str) -> list[str]:
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return [f"`{path}` is empty."]
    try:
        saved = saved_model_pb2.SavedModel.FromString(data)
    except DecodeError:
        return [f"`{path}` is truncated or damaged: it does not parse as a SavedModel."]
    if not any("serve" in meta.meta_info_def.tags for meta in saved.meta_graphs):
        return [f"`{path}` holds no MetaGraph tagged 'serve', the one a server loads."]
    return []


def _variables_problems(folder: str) -> list[str]:
    parent = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return [f"`{parent}` has no variables/ folder (the model's weights)."]
    index = os.path.join(folder, "variables.index")
    if not os.path.isfile(index):
        return [f"`{index}` is missing (the index of the model's weights)."]
    problems = []
    shards = re.compile(r"variables\.data-([0-9]+)-of-([0-9]+)")
    found = [shards.fullmatch(name) for name in os.listdir(folder)]
    found = [m for m in found if m]
    if not found:
        problems.append(f"`{folder}` has no variables.data-* file (the model's weights).")
    else:
        count = int(found[0][2])
        for shard in range(count):
            name = f"variables.data-{shard:05d}-of-{count:05d}"
            if not os.path.isfile(os.path.join(folder, name)):
                problems.append(f"`{os.path.join(folder, name)}` is missing.")
    return problems


def _warmup_records(path: str):
    """Parse the warmup file; `(requests, problem)`, problem None if all records read."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        return [], (
            f"cannot read `{path}`: tensorflow-serving-api is not installed "
            "(pip install keras-lstm[serving])."
        )
    requests = []
    iterator = iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            break
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as error:
            return requests, (
                f"`{path}` is damaged: record {len(requests) + 1} is not a readable TFRecord "
                f"({_reason(error)})."
            )
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        except DecodeError:
            return requests, (
                f"`{path}` is damaged: record {len(requests) + 1} is not a PredictionLog."
            )
        if not log.HasField("predict_log"):
            return requests, (f"`{path}`: record {len(requests) + 1} is not a Predict request.")
        requests.append(log.predict_log.request)
    if not requests:
        return requests, f"`{path}` holds no request."
    return requests, None


def _warmup_problems(path: str) -> list[str]:
    _, problem = _warmup_records(path)
    return [problem] if problem else []


def random_inputs(signature, batch_size: int, timesteps: int, seed: int = 0) -> dict:
    """Random arguments for `signature`: free batch and time axes filled in."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in signature.structured_input_signature[1].items():
        if spec.shape.rank == 0 and spec.dtype.is_integer:
            inputs[name] = tf.constant(batch_size, spec.dtype)  # initial_state's batch_size
            continue
        shape = [batch_size] + [timesteps if d is None else d for d in spec.shape.as_list()[1:]]
        inputs[name] = tf.constant(_value_of(spec.dtype, shape[: spec.shape.rank], rng), spec.dtype)
    return inputs


def _value_of(dtype, shape, rng):
    """An array of `shape` that a tensor of `dtype` takes: random floats, else zeros
    (empty strings, False)."""
    import numpy as np

    if dtype.is_floating:
        return rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
    if dtype.name == "string":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype.as_numpy_dtype)


def replay_warmup(export_dir: str, loaded) -> int:
    """Call the export with each warmup request; return how many there were.

    Raises ValueError naming the first request that cannot be read or that
    the export does not answer.
    """
    import tensorflow as tf

    path = os.path.join(export_dir, WARMUP_FILE)
    requests, problem = _warmup_records(path)
    if problem:
        raise ValueError(problem)
    for number, request in enumerate(requests, 1):
        name = request.model_spec.signature_name or "serving_default"
        if name not in loaded.signatures:
            raise ValueError(
                f"warmup request {number} of `{path}` calls signature {name!r}, which the "
                f"export does not have (it has {sorted(loaded.signatures)})."
            )
        try:
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            loaded.signatures[name](**inputs)
        except Exception as error:
            raise ValueError(
                f"warmup request {number} of `{path}` (signature {name!r}) fails: {_reason(error)}"
            ) from None
    return len(requests)


def check(base_dir: str) -> int:
    """Load the newest version in `base_dir` and call it; 0 if it works, else 1.

    Problems go to stderr, one line each; the report of a working export to
    stdout.
    """
    try:
        export_dir = newest_version(base_dir)
    except ValueError as error:
        return _fail([str(error)])
    problems = problems_on_disk(export_dir)
    if problems:
        return _fail(problems)

    import tensorflow as tf

    print(f"Loading {export_dir} with tf.saved_model.load")
    try:
        loaded = tf.saved_model.load(export_dir)
    except Exception as error:
        return _fail([f"`{export_dir}` does not load with tf.saved_model.load: {_reason(error)}"])
    if not loaded.signatures:
        return _fail([f"`{export_dir}` has no signatures, so a server has nothing to call."])
    problems = []
    for name, signature in sorted(loaded.signatures.items()):
        print(f"\nsignature {name!r}")
        for key, spec in sorted(signature.structured_input_signature[1].items()):
            print(f"  input  {key}: {_describe(spec)}")
        for key, spec in sorted(signature.structured_outputs.items()):
            print(f"  output {key}: {_describe(spec)}")
        try:
            outputs = signature(**random_inputs(signature, batch_size=2, timesteps=5))
        except Exception as error:
            problems.append(
                f"signature {name!r} of `{export_dir}` fails on random inputs (batch 2, "
                f"5 time steps): {_reason(error)}"
            )
            continue
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(outputs.items()))
        print(f"  ran on random inputs (batch 2, 5 time steps): {shapes}")
    if os.path.exists(os.path.join(export_dir, WARMUP_FILE)):
        try:
            print(f"\nwarmup: {replay_warmup(export_dir, loaded)} requests answered")
        except ValueError as error:
            problems.append(str(error))
    else:
        print("\nwarmup: none")
    if problems:
        return _fail(problems)
    print("OK")
    return 0


def _fail(problems: list[str]) -> int:
    sys.stdout.flush()
    for problem in problems:
        print(PREFIX + problem, file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: _serve_check.py BASE_DIR")
    try:
        code = check(sys.argv[1])
    except Exception as error:  # one line, never a traceback
        code = _fail([f"{type(error).__name__}: {_reason(error)}"])
    sys.exit(code)

"""The private Keras and TensorFlow names keras_lstm uses still work, each checked by name.

When a Keras or TensorFlow release moves one, this test says which, instead of a
failure somewhere inside the layer, the exporters or the serving code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keras_lstm
from keras_lstm import _internals

PACKAGE = Path(keras_lstm.__file__).parent


def test_every_private_use_works_with_the_installed_versions():
    problems = _internals.smoke_check()
    assert not problems, "\n".join(problems)


def test_no_module_but_internals_imports_private_keras_or_tensorflow_code():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith(("keras.src", "tensorflow.python")):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert not offenders, offenders

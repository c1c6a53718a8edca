"""Every example in a public docstring runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import keras_lstm


def _modules():
    names = ["keras_lstm"]
    for info in pkgutil.walk_packages(keras_lstm.__path__, "keras_lstm."):
        if not info.name.rsplit(".", 1)[-1].startswith("_") and info.name != "keras_lstm.cli":
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_every_public_name_has_a_docstring_with_an_example():
    for name in keras_lstm.__all__:
        if name.startswith("__"):
            continue
        doc = getattr(keras_lstm, name).__doc__ or ""
        assert ">>>" in doc, f"keras_lstm.{name} has no runnable example in its docstring"

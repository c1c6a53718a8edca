"""Shared fixtures: quiet TensorFlow, fixed seeds, small random batches."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `benchmarks` (a top-level folder, not installed) for the tests that run it;
# appended, so that an installed keras_lstm still comes first.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _native_libraries_built_at_once():
    """Builds the native kernel and its XLA library first, at the same time (as
    `keras-lstm build` does), rather than one after the other on first use; a
    machine that cannot build them runs the suite on TensorFlow ops, as a user's
    would (the build's own tests use caches of their own)."""
    if keras.backend.backend() == "tensorflow":
        from keras_lstm import kernels

        try:
            kernels.build_native()
        except RuntimeError as error:
            print(f"\nnative kernel not built here: {error}")
    yield


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    yield
    _clear_session()


def _clear_session():
    """Keras's global state reset after each test, without the full garbage
    collection Keras adds to it by default (Python's own collector still runs):
    that collection, over the whole suite's TensorFlow objects, took most of a
    short test's time."""
    try:
        keras.backend.clear_session(free_memory=False)
    except TypeError:  # an older Keras takes no argument
        keras.backend.clear_session()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def fused_calls(monkeypatch):
    """The `options` of each fused-op call made (a list that fills as layers run)."""
    calls = []
    from keras_lstm import kernels

    real = kernels.lstm_recurrence

    def spy(*args, **kwargs):
        calls.append(args[1].options)  # lstm_recurrence(route, sequence, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lstm_recurrence", spy)
    return calls

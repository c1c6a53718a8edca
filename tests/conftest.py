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


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


@pytest.fixture
def rng():
    return np.random.default_rng(0)

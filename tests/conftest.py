"""Shared pytest configuration: one backend per pytest process."""

import os

import keras
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_report_header(config):
    return f"keras backend: {keras.backend.backend()}, keras {keras.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def fused_calls(monkeypatch):
    """`(name, ran)` for every call of `backends.fused_train` /
    `fused_infer` while the test runs: which fast paths ran, and which
    declined (returned None)."""
    from keras_bn import backends

    calls = []
    for name in ("fused_train", "fused_infer"):
        original = getattr(backends, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            calls.append((_name, result is not None))
            return result

        monkeypatch.setattr(backends, name, wrapper)
    return calls

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
    """`(name, ran)` for every backend kernel a layer call tried while the
    test runs (`"fused_train"` / `"fused_infer"`; `ran` is False where the
    kernel handed the call back to the reference path)."""
    from keras_bn.layers.batch_normalization import BatchNormalization

    calls = []
    original = BatchNormalization._run_kernel

    def wrapper(self, kernel, x, batch, *args):
        result = original(self, kernel, x, batch, *args)
        calls.append(("fused_train" if batch else "fused_infer",
                      result is not None))
        return result

    monkeypatch.setattr(BatchNormalization, "_run_kernel", wrapper)
    return calls

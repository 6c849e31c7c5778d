"""The default fast paths against float64, to the last rounding.

Written for PyTorch's exact path (half-precision batches read by ATen's
mixed-type kernels, dx formed in row chunks), but the layer's contract is
the same on every backend, so these run on all of them: statistics and
float32 gradients within 1e-5 of the float64 NumPy reference
(tests/reference.py), and half-precision outputs and input gradients
rounded once from values that accurate (never twice, never from half-
precision statistics). On PyTorch the chunk size is lowered so that dx is
formed in several chunks, the last one shorter.
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from tests import reference as ref

BACKEND = keras.backend.backend()
EPS = 1e-3
# Unit roundoff of the half types: 8 and 11 significant bits.
UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 0.0}


@pytest.fixture
def ran(fused_calls, monkeypatch):
    """Names of the `backends.fused_*` calls that did not decline, read
    when asked; on PyTorch, dx chunks of 4,000 values (rows * channels
    below divide into several chunks and a shorter last one)."""
    if BACKEND == "torch":
        from keras_bn.backends import torch_backend

        monkeypatch.setattr(torch_backend, "_CHUNK", 4000)
    return lambda: [name for name, ok in fused_calls if ok]


def _as(values, dtype):
    """`values` rounded to `dtype`, as float32 NumPy (exact for halves)."""
    return keras.ops.convert_to_numpy(keras.ops.cast(
        keras.ops.cast(np.asarray(values, "float32"), dtype), "float32"))


def assert_rounded_once(actual, expected, dtype, what):
    """Each value within one rounding to `dtype` of a float32 result that is
    within 1e-5 (times the reference's scale) of `expected` (float64)."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape)
    slack = 1e-5 * max(1.0, float(np.max(np.abs(expected))))
    bound = UNIT[dtype] * (np.abs(expected) + slack) + slack
    excess = np.abs(actual - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"{what}: {actual[worst]!r} vs {expected[worst]!r} at {worst}, "
        f"more than one rounding to {dtype} away")


def _relu_batch(rng, shape, dtype):
    """ReLU-like activations (mean 0.6 std, never centred) and an upstream
    gradient with a mean of its own: float32 sums over a whole channel drift
    on both."""
    x = np.maximum(rng.normal(0.1, 0.3, size=shape), 0.0)
    dy = rng.normal(0.5, 1.0, size=shape)
    return _as(x, dtype), _as(dy, dtype)


def _check_training(layer, x, dy, dtype, ran):
    layer.build(x.shape)
    channels = x.shape[-1]
    gamma = keras.ops.convert_to_numpy(layer.gamma) if layer.scale \
        else np.ones(channels)
    beta = keras.ops.convert_to_numpy(layer.beta) if layer.center \
        else np.zeros(channels)
    # x in the layer's compute dtype, as the layer before it would give.
    result = _execution.run(layer, keras.ops.cast(x, dtype), upstream=dy)
    if BACKEND == "torch":
        assert ran() == ["fused_train"], ran()
    axes = (x.ndim - 1,)
    y_ref, mu, var = ref.forward_train(x, axes, gamma, beta, EPS)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(x, dy, axes, gamma,
                                                       EPS)
    assert keras.backend.standardize_dtype(layer.compute_dtype) == dtype
    assert result.dtype == dtype
    # (Half-precision values come back as float32, which is exact.)
    for value, expected, what in ((result.outputs, y_ref, "outputs"),
                                  (result.dx, dx_ref, "d inputs")):
        np.testing.assert_array_equal(value, _as(value, dtype), what)
        assert_rounded_once(value, expected, dtype, what)
    if layer.scale:
        ref.assert_close(result.grads["gamma"], dgamma_ref, what="d gamma")
    if layer.center:
        ref.assert_close(result.grads["beta"], dbeta_ref, what="d beta")
    # momentum=0: the moving statistics are the batch's, in float32.
    for name, expected in (("mean", mu), ("variance", var)):
        moving = result.moving[f"moving_{name}"]
        assert moving.dtype == np.float32
        ref.assert_close(moving, expected.ravel(), what=f"moving {name}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_conv_training_rounds_once(ran, dtype):
    # 57,600 values a channel, NHWC: PyTorch's grouped statistics and a dx
    # in 116 chunks of 500 rows (the last one 100 rows).
    rng = np.random.default_rng(20)
    x, dy = _relu_batch(rng, (64, 30, 30, 8), dtype)
    layer = keras_bn.BatchNormalization(
        momentum=0.0, dtype=f"mixed_{dtype}",
        gamma_initializer=keras.initializers.RandomUniform(0.5, 2.0, seed=1),
        beta_initializer=keras.initializers.RandomNormal(0.0, 1.0, seed=2))
    _check_training(layer, x, dy, dtype, ran)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_dense_training_matches_float64(ran, dtype, center, scale):
    # 3,000 rows (groups of 125) of 48 features; half precision: dx in 37
    # chunks of 83 rows (the last one 12 rows).
    rng = np.random.default_rng(21)
    x, dy = _relu_batch(rng, (3000, 48), dtype)
    policy = "float32" if dtype == "float32" else f"mixed_{dtype}"
    layer = keras_bn.BatchNormalization(momentum=0.0, dtype=policy,
                                        center=center, scale=scale)
    _check_training(layer, x, dy, dtype, ran)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_large_mean_training_rounds_once(ran, dtype):
    # |mean| / std = 30: normalized after a float32 shift, still one
    # rounding of a float32-exact result.
    rng = np.random.default_rng(22)
    shape = (2048, 16)
    x = _as(30.0 + rng.normal(size=shape), dtype)
    dy = _as(rng.normal(size=shape), dtype)
    layer = keras_bn.BatchNormalization(momentum=0.0, dtype=f"mixed_{dtype}")
    _check_training(layer, x, dy, dtype, ran)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mean", [0.3, 50.0], ids=["small", "large"])
def test_half_precision_inference_rounds_once(ran, dtype, mean):
    # A large moving mean (50 std) takes the reference path on PyTorch,
    # whose float32 arithmetic must round once all the same.
    rng = np.random.default_rng(23)
    shape = (32, 6, 6, 16)
    x = _as(mean + rng.normal(size=shape), dtype)
    layer = keras_bn.BatchNormalization(dtype=f"mixed_{dtype}")
    layer.build(shape)
    weights = {
        "gamma": rng.uniform(0.5, 2.0, 16), "beta": rng.normal(size=16),
        "moving_mean": mean + rng.normal(0.0, 0.1, 16),
        "moving_variance": rng.uniform(0.5, 1.5, 16),
    }
    for name, value in weights.items():
        getattr(layer, name).assign(value.astype("float32"))
    y = keras.ops.convert_to_numpy(
        keras.ops.cast(layer(x, training=False), "float32"))
    if BACKEND == "torch":
        assert ran() == (["fused_infer"] if mean < 1 else []), ran()
    expected = ref.forward_infer(
        x, (3,), weights["gamma"], weights["beta"], weights["moving_mean"],
        weights["moving_variance"], EPS)
    assert_rounded_once(y, expected, dtype, "outputs")

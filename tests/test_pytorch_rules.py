"""PyTorch's update rules as layer options (issue 14, section 1).

`moving_variance_estimator="unbiased"` and `momentum=None` (the cumulative
average counted by `num_batches_tracked`), checked against a float64 NumPy
implementation of PyTorch's rule (`reference.pytorch_running`) on every
backend, and against `torch.nn.BatchNorm2d` itself on the torch backend.
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from tests import reference as ref

CHANNELS = 4
# |mean| / std ~ 1e4 on the first two channels.
LOC = np.array([1e4, -1e4, 2.0, -0.5])
SCALE = np.array([1.0, 1.0, 3.0, 0.5])
EPS = 1e-3

PYTORCH_CONFIGS = {
    "unbiased": dict(momentum=0.9, moving_variance_estimator="unbiased"),
    "cumulative": dict(momentum=None),
    "cumulative-unbiased": dict(momentum=None,
                                moving_variance_estimator="unbiased"),
}


def _batches(rng):
    """`(x, mask, w)` per step: batch sizes differ, one step is masked
    with a mask that keeps a different count in each channel, and one is
    large enough for the backends' kernels (2**17 values)."""
    steps = []
    for shape, masked in (((6, 4, 4), False), ((9, 2, 3), False),
                          ((5, 4, 4), True), ((64, 16, 32), False),
                          ((3, 3, 3), False)):
        shape = shape + (CHANNELS,)
        x = (LOC + SCALE * rng.standard_normal(shape)).astype("float32")
        mask = w = None
        if masked:
            mask = rng.uniform(size=shape) < np.linspace(0.3, 0.9, CHANNELS)
            mask[:2] = True  # at least two values in every channel
            w = mask.astype(np.float64)
        steps.append((x, mask, w))
    return steps


def _layer(rng, **kwargs):
    layer = keras_bn.BatchNormalization(epsilon=EPS, **kwargs)
    layer.build((None, 1, 1, CHANNELS))
    layer.gamma.assign(rng.uniform(0.5, 1.5, CHANNELS).astype("float32"))
    layer.beta.assign(rng.normal(size=CHANNELS).astype("float32"))
    return layer


def _close(actual, expected, rtol, what):
    """Per channel, relative to the channel's own magnitude."""
    actual = np.asarray(actual, np.float64)
    err = np.abs(actual - expected)
    bound = rtol * np.maximum(np.abs(expected), 1e-3)
    assert np.all(err <= bound), (what, err / np.maximum(np.abs(expected),
                                                         1e-3))


def _check_steps(config, mode, rng):
    layer = _layer(rng, **config)
    gamma = keras.ops.convert_to_numpy(layer.gamma)
    beta = keras.ops.convert_to_numpy(layer.beta)
    momentum = config["momentum"]
    unbiased = config.get("moving_variance_estimator") == "unbiased"
    mean = np.zeros(CHANNELS)
    var = np.ones(CHANNELS)
    for t, (x, mask, w) in enumerate(_batches(rng), start=1):
        result = _execution.run(layer, x, mode=mode, mask=mask, grad=False)
        y, mu, bvar = ref.forward_train(x, (3,), gamma, beta, EPS, w)
        n, _, _ = ref.batch_stats(x, (3,), w)
        mu, bvar, n = mu.ravel(), bvar.ravel(), n.ravel()
        factor = 1.0 / t if momentum is None else 1.0 - momentum
        if unbiased:
            mean, var = ref.pytorch_running(mean, var, mu, bvar, n, factor)
        else:  # PyTorch's cumulative average of the biased variance
            mean = (1.0 - factor) * mean + factor * mu
            var = (1.0 - factor) * var + factor * bvar
        ref.assert_close(result.outputs, y, 1e-5, what=f"outputs, step {t}")
        _close(result.moving["moving_mean"], mean, 1e-6, f"mean, step {t}")
        _close(result.moving["moving_variance"], var, 1e-6,
               f"variance, step {t}")
        if momentum is None:
            assert int(result.moving["num_batches_tracked"]) == t
    # Inference with the moving statistics as stored (float32: a moving
    # mean of 1e4 is rounded by 5e-4, as much as the output then differs
    # from one with the float64 mean).
    x = _batches(rng)[0][0]
    expected = ref.forward_infer(
        x, (3,), gamma, beta, keras.ops.convert_to_numpy(layer.moving_mean),
        keras.ops.convert_to_numpy(layer.moving_variance), EPS)
    ref.assert_close(keras.ops.convert_to_numpy(layer(x, training=False)),
                     expected, 1e-5,
                     what="inference")


@pytest.mark.parametrize("name", list(PYTORCH_CONFIGS))
def test_pytorch_rules_match_float64_reference(name):
    _check_steps(PYTORCH_CONFIGS[name], "eager", np.random.default_rng(1))


@pytest.mark.parametrize("mode", _execution.modes()[1:])
def test_pytorch_rules_compiled_match_float64_reference(mode):
    if mode == "compile":
        # It compiles every step's shape afresh (minutes on a small CPU);
        # test_small_batches fits with torch.compile.
        pytest.skip("torch.compile: one compilation per step")
    _check_steps(PYTORCH_CONFIGS["cumulative-unbiased"], mode,
                 np.random.default_rng(2))


def test_default_weights_unchanged_and_counter_only_when_cumulative():
    layer = keras_bn.BatchNormalization(moving_variance_estimator="unbiased")
    layer.build((None, 3))
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build((None, 3))
    assert len(layer.get_weights()) == len(keras_layer.get_weights())
    layer = keras_bn.BatchNormalization(momentum=None)
    layer.build((None, 3))
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance",
        "num_batches_tracked"]
    counter = layer.num_batches_tracked
    assert not counter.trainable and tuple(counter.shape) == ()
    assert keras.backend.standardize_dtype(counter.dtype) == "int32"
    assert int(keras.ops.convert_to_numpy(counter)) == 0


def test_renorm_unbiased_matches_float64_reference():
    """With renorm the moving and renorm stddevs follow the unbiased
    variance; the corrections r and d use the biased one."""
    rng = np.random.default_rng(3)
    x = (2.0 + 3.0 * rng.standard_normal((7, 5, CHANNELS))).astype("float32")
    layer = keras_bn.BatchNormalization(
        renorm=True, momentum=0.8, renorm_momentum=0.7, epsilon=EPS,
        moving_variance_estimator="unbiased")
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    n, mu, var = (v.ravel() for v in ref.batch_stats(x, (2,)))
    r, d = ref.renorm_correction(mu, var, 0.0, 1.0, EPS, {})
    expected, _, _ = ref.forward_train(x, (2,), np.ones(CHANNELS),
                                       np.zeros(CHANNELS), EPS, r=r, d=d)
    ref.assert_close(y, expected, 1e-5, what="outputs")
    stddev = np.sqrt(var * n / (n - 1) + EPS)
    moving_stddev = ref.ema(1.0, stddev, 0.8)
    expected = {
        "moving_mean": ref.ema(0.0, mu, 0.8),
        "moving_stddev": moving_stddev,
        "moving_variance": np.maximum(moving_stddev**2 - EPS, 0.0),
        "renorm_mean": ref.ema(0.0, mu, 0.7),
        "renorm_stddev": ref.ema(1.0, stddev, 0.7),
    }
    for name, value in expected.items():
        _close(keras.ops.convert_to_numpy(getattr(layer, name)), value, 1e-6,
               name)


# ------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, error, words", [
    ({"moving_variance_estimator": "Unbiased"}, ValueError,
     ["moving_variance_estimator", "'Unbiased'", "biased"]),
    ({"moving_variance_estimator": None}, ValueError,
     ["moving_variance_estimator", "None"]),
    ({"momentum": "none"}, TypeError, ["momentum", "'none'", "or None"]),
    ({"momentum": 1.5}, ValueError, ["momentum", "1.5", "or None"]),
    ({"momentum": None, "renorm": True}, ValueError,
     ["momentum=None", "renorm=True"]),
])
def test_bad_arguments_name_argument_and_value(kwargs, error, words):
    with pytest.raises(error) as info:
        keras_bn.BatchNormalization(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_config_round_trip():
    layer = keras_bn.BatchNormalization(
        momentum=None, moving_variance_estimator="unbiased")
    config = layer.get_config()
    assert config["momentum"] is None
    assert config["moving_variance_estimator"] == "unbiased"
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert keras_bn.BatchNormalization().get_config()[
        "moving_variance_estimator"] == "biased"


def test_saved_model_keeps_counter(tmp_path):
    rng = np.random.default_rng(4)
    model = keras.Sequential([
        keras.Input((3,)),
        keras_bn.BatchNormalization(momentum=None,
                                    moving_variance_estimator="unbiased"),
    ])
    for _ in range(3):
        model(rng.normal(size=(5, 3)).astype("float32"), training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.layers[0]
    assert bn.momentum is None and bn.moving_variance_estimator == "unbiased"
    assert int(keras.ops.convert_to_numpy(bn.num_batches_tracked)) == 3
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- torch

torch_only = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="compares with torch.nn.BatchNorm2d")


def _np(t):
    return t.detach().cpu().numpy()


@torch_only
@pytest.mark.parametrize("torch_momentum", [0.1, None],
                         ids=["momentum-0.1", "momentum-None"])
def test_matches_torch_batchnorm2d(torch_momentum):
    """Ten training steps of torch.nn.BatchNorm2d and of the layer set up
    as PyTorch's (NCHW, axis=1), same weights and batches: outputs,
    gradients and running statistics within 1e-5, inference within 1e-6."""
    import torch

    rng = np.random.default_rng(5)
    channels, eps = 3, 1e-5
    bn = torch.nn.BatchNorm2d(channels, eps=eps, momentum=torch_momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, channels)))
        bn.bias.copy_(torch.tensor(rng.normal(size=channels)))
    layer = keras_bn.BatchNormalization(
        axis=1, epsilon=eps, moving_variance_estimator="unbiased",
        momentum=None if torch_momentum is None else 1.0 - torch_momentum)
    layer.build((None, channels, 5, 5))
    layer.gamma.assign(_np(bn.weight))
    layer.beta.assign(_np(bn.bias))
    loc = np.array([3.0, -2.0, 0.5])[None, :, None, None]
    for step in range(10):
        batch = 2 + step % 5
        x = (loc + rng.standard_normal((batch, channels, 5, 5))).astype(
            "float32")
        dy = rng.standard_normal(x.shape).astype("float32")
        tx = torch.tensor(x, requires_grad=True)
        bn.zero_grad()
        bn.train()
        ty = bn(tx)
        ty.backward(torch.tensor(dy))
        result = _execution.run(layer, x, mode="eager", upstream=dy)
        what = f"step {step}"
        ref.assert_close(result.outputs, _np(ty), 1e-5, what + " outputs")
        ref.assert_close(result.dx, _np(tx.grad), 1e-5, what + " dx")
        ref.assert_close(result.grads["gamma"], _np(bn.weight.grad), 1e-5,
                         what + " dgamma")
        ref.assert_close(result.grads["beta"], _np(bn.bias.grad), 1e-5,
                         what + " dbeta")
        ref.assert_close(result.moving["moving_mean"], _np(bn.running_mean),
                         1e-5, what + " running_mean")
        ref.assert_close(result.moving["moving_variance"],
                         _np(bn.running_var), 1e-5, what + " running_var")
    if torch_momentum is None:
        assert int(bn.num_batches_tracked) == 10
        assert int(result.moving["num_batches_tracked"]) == 10
    bn.eval()
    x = (loc + rng.standard_normal((4, channels, 5, 5))).astype("float32")
    with torch.no_grad():
        expected = _np(bn(torch.tensor(x)))
    ref.assert_close(keras.ops.convert_to_numpy(layer(x, training=False)),
                     expected, 1e-6,
                     "inference")


def test_convert_to_keras_layer_refuses_pytorch_rules():
    """Keras's layer cannot train with PyTorch's rules: a training copy
    raises, naming them; an inference-only config drops them."""
    from keras_bn.convert import convert
    from keras_bn.convert import keras_layer_config

    for kwargs in (dict(momentum=None),
                   dict(moving_variance_estimator="unbiased")):
        model = keras.Sequential([keras.Input((3,)),
                                  keras_bn.BatchNormalization(**kwargs)])
        with pytest.raises(ValueError) as info:
            convert(model, to=keras.layers.BatchNormalization)
        for key, value in kwargs.items():
            assert f"{key}={value!r}" in str(info.value)
        config = keras_layer_config(model.layers[0].get_config(), "bn",
                                    training=False)
        layer = keras.layers.BatchNormalization.from_config(config)
        assert layer.momentum == 0.99
    # Back to Keras's rules first, then to Keras's layer.
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNormalization(
        momentum=None, moving_variance_estimator="unbiased")])
    plain = convert(model, momentum=0.99, moving_variance_estimator="biased")
    assert type(convert(plain, to=keras.layers.BatchNormalization).layers[0]
                ) is keras.layers.BatchNormalization


def test_ghost_batches_unbiased_uses_pooled_count():
    """Ghost batches: the moving variance is the groups' average variance
    (sum of their m2 over the pooled count n), scaled by n / (n - 1)."""
    rng = np.random.default_rng(6)
    x = (5.0 + 2.0 * rng.standard_normal((10, 3, CHANNELS))).astype("float32")
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=4, momentum=0.7,
        moving_variance_estimator="unbiased")
    layer(x, training=True)
    groups = [x[0:4], x[4:8], x[8:10]]  # the last group is smaller
    x64 = [g.astype(np.float64).reshape(-1, CHANNELS) for g in groups]
    n = sum(len(g) for g in x64)
    m2 = sum(((g - g.mean(0)) ** 2).sum(0) for g in x64)
    mean = np.concatenate(x64).mean(0)
    _close(keras.ops.convert_to_numpy(layer.moving_mean),
           ref.ema(0.0, mean, 0.7), 1e-6, "moving_mean")
    _close(keras.ops.convert_to_numpy(layer.moving_variance),
           ref.ema(1.0, m2 / n * n / (n - 1), 0.7), 1e-6, "moving_variance")

"""keras_bn.models: the articles' architectures (DESIGN.md section 2)."""

import functools

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import models
from tests.bn_models import randomize_bn

OURS = keras_bn.BatchNormalization
KERAS = keras.layers.BatchNormalization

# (builder, kwargs, layers as (name, class name, units/filters, activation)).
# BN layers are listed as ("batch_norm_i", "BN").
ARCHITECTURES = {
    "article3": (models.mnist_dense, {"variant": "article3"}, [
        ("dense_1", "Dense", 128, "relu"), ("batch_norm_1", "BN"),
        ("output", "Dense", 10, "softmax")]),
    "article1": (models.mnist_dense, {"variant": "article1"}, [
        ("dense_1", "Dense", 256, "relu"), ("batch_norm_1", "BN"),
        ("output", "Dense", 10, "softmax")]),
    "article2": (models.mnist_dense, {"variant": "article2"}, [
        ("dense_1", "Dense", 64, "relu"), ("batch_norm_1", "BN"),
        ("dense_2", "Dense", 64, "relu"), ("batch_norm_2", "BN"),
        ("output", "Dense", 10, "softmax")]),
    "sigmoid": (models.mnist_sigmoid, {}, [
        ("dense_1", "Dense", 100, "linear"), ("batch_norm_1", "BN"),
        ("sigmoid_1", "Activation"),
        ("dense_2", "Dense", 100, "linear"), ("batch_norm_2", "BN"),
        ("sigmoid_2", "Activation"),
        ("dense_3", "Dense", 100, "linear"), ("batch_norm_3", "BN"),
        ("sigmoid_3", "Activation"),
        ("output", "Dense", 10, "softmax")]),
    "cifar": (models.cifar10_conv, {}, [
        ("conv_1", "Conv2D", 32, "relu"), ("batch_norm_1", "BN"),
        ("pool_1", "MaxPooling2D"),
        ("conv_2", "Conv2D", 64, "relu"), ("batch_norm_2", "BN"),
        ("pool_2", "MaxPooling2D"),
        ("conv_3", "Conv2D", 64, "relu"), ("batch_norm_3", "BN"),
        ("flatten", "Flatten"), ("dense", "Dense", 64, "relu"),
        ("dropout", "Dropout"), ("output", "Dense", 10, "softmax")]),
}

# Parameter counts worked out by hand (weights + biases; BN holds gamma,
# beta, moving mean and moving variance per channel), (with BN, without).
PARAMS = {
    # 784*128+128 + 4*128 + 128*10+10
    "article3": (102282, 101770),
    # 784*256+256 + 4*256 + 256*10+10
    "article1": (204554, 203530),
    # 784*64+64 + 4*64 + 64*64+64 + 4*64 + 64*10+10
    "article2": (55562, 55050),
    # with BN, no hidden biases: 784*100 + 2*100*100 + 3*4*100 + 100*10+10;
    # without: 784*100+100 + 2*(100*100+100) + 100*10+10
    "sigmoid": (100610, 99710),
    # 3x3 valid convs, 2x2 pools: 32 -> 30 -> 15 -> 13 -> 6 -> 4, flat 1024;
    # (27*32+32) + (288*64+64) + (576*64+64) + 1024*64+64 + 64*10+10,
    # plus 4*(32+64+64) for BN.
    "cifar": (123210, 122570),
}


@functools.lru_cache(maxsize=None)
def _build(key, batch_norm=True, norm_layer=None):
    """Builds once per argument set (JAX compiles each initializer): the
    structure tests below only read the models."""
    builder, base_kwargs, _ = ARCHITECTURES[key]
    return builder(**base_kwargs, batch_norm=batch_norm, norm_layer=norm_layer)


def _describe(model):
    rows = []
    for layer in model.layers:
        kind = type(layer).__name__
        if isinstance(layer, (OURS, KERAS)):
            rows.append((layer.name, "BN"))
            continue
        size = getattr(layer, "units", getattr(layer, "filters", None))
        activation = getattr(layer, "activation", None)
        if size is None:
            rows.append((layer.name, kind))
        else:
            rows.append((layer.name, kind, size, activation.__name__))
    return rows


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_architecture_matches_the_articles(key):
    model = _build(key)
    assert _describe(model) == ARCHITECTURES[key][2]
    assert all(type(l) is OURS for l in model.layers
               if isinstance(l, (OURS, KERAS)))
    assert model.count_params() == PARAMS[key][0]


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_without_batch_norm_only_drops_the_norm_layers(key):
    model = _build(key, batch_norm=False, norm_layer=KERAS)
    expected = [row for row in ARCHITECTURES[key][2] if row[1] != "BN"]
    if key == "sigmoid":  # hidden Dense layers keep their bias without BN
        assert all(l.use_bias for l in model.layers
                   if isinstance(l, keras.layers.Dense))
    assert _describe(model) == expected
    assert model.count_params() == PARAMS[key][1]


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_norm_layer_swaps_the_class_and_keeps_names(key):
    ours = _build(key)
    theirs = _build(key, norm_layer=KERAS)
    assert [l.name for l in theirs.layers] == [l.name for l in ours.layers]
    assert [w.shape for w in theirs.weights] == [w.shape for w in ours.weights]
    assert any(type(l) is KERAS for l in theirs.layers)
    assert not any(type(l) is OURS for l in theirs.layers)


def test_names_do_not_depend_on_models_built_before():
    first = [l.name for l in models.mnist_dense("article2").layers]
    models.cifar10_conv()
    keras.layers.Dense(3)  # would bump Keras's automatic "dense_N" names
    assert [l.name for l in models.mnist_dense("article2").layers] == first
    assert models.mnist_dense().name == "mnist_dense_article3_bn"
    assert models.mnist_dense(batch_norm=False).name == "mnist_dense_article3"


def test_norm_layer_accepts_a_factory():
    model = models.mnist_dense(
        norm_layer=functools.partial(OURS, momentum=0.9))
    assert model.get_layer("batch_norm_1").momentum == 0.9


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _bn(h, gamma, beta, mean, var, eps):
    return gamma * (h - mean) / np.sqrt(var + eps) + beta


def _randomize(model, rng):
    """Random weights: the kernels and biases here, the batch-norm layers'
    parameters and statistics from `randomize_bn`. Returns every weight
    (`model.weights` order) in float64."""
    for layer in model.layers:
        if not isinstance(layer, (OURS, KERAS)):
            for w in layer.weights:
                w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    randomize_bn(model, rng)
    return [np.asarray(keras.ops.convert_to_numpy(w), np.float64)
            for w in model.weights]


@pytest.mark.parametrize("norm_layer", [OURS, KERAS], ids=["ours", "keras"])
def test_mnist_dense_inference_matches_numpy(norm_layer):
    # Article 3: BN after the ReLU.
    model = models.mnist_dense("article3", norm_layer=norm_layer)
    rng = np.random.default_rng(0)
    w1, b1, gamma, beta, mean, var, w2, b2 = _randomize(model, rng)
    x = rng.uniform(0, 1, (5, 784))
    h = _bn(np.maximum(x @ w1 + b1, 0), gamma, beta, mean, var, 1e-3)
    expected = _softmax(h @ w2 + b2)
    got = keras.ops.convert_to_numpy(model(x.astype("float32"),
                                           training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm_layer", [OURS, KERAS], ids=["ours", "keras"])
def test_mnist_sigmoid_normalizes_before_the_nonlinearity(norm_layer):
    model = models.mnist_sigmoid(norm_layer=norm_layer)
    rng = np.random.default_rng(1)
    weights = _randomize(model, rng)
    x = rng.uniform(0, 1, (5, 784))
    h = x
    for i in range(3):
        kernel, gamma, beta, mean, var = weights[5 * i:5 * i + 5]
        h = _sigmoid(_bn(h @ kernel, gamma, beta, mean, var, 1e-3))
    expected = _softmax(h @ weights[15] + weights[16])
    got = keras.ops.convert_to_numpy(model(x.astype("float32"),
                                           training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _conv3x3(h, kernel, bias):
    """A 3x3 valid convolution, channels last."""
    patches = np.lib.stride_tricks.sliding_window_view(h, (3, 3), axis=(1, 2))
    return np.einsum("bhwcij,ijcf->bhwf", patches, kernel) + bias


def _max_pool(h):
    b, height, width, c = h.shape
    h = h[:, :height // 2 * 2, :width // 2 * 2]
    return h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("norm_layer", [OURS, KERAS], ids=["ours", "keras"])
def test_cifar_model_inference_matches_numpy(norm_layer):
    """Conv -> ReLU -> BN -> pool, three times, then the dense head, in
    float64 NumPy (dropout is the identity at inference)."""
    model = models.cifar10_conv(norm_layer=norm_layer)
    rng = np.random.default_rng(2)
    weights = _randomize(model, rng)
    x = rng.uniform(0, 1, (3, 32, 32, 3))
    h = x
    for i in range(3):
        kernel, bias, gamma, beta, mean, var = weights[6 * i:6 * i + 6]
        h = _bn(np.maximum(_conv3x3(h, kernel, bias), 0), gamma, beta, mean,
                var, 1e-3)
        if i < 2:
            h = _max_pool(h)
    w1, b1, w2, b2 = weights[18:]
    h = np.maximum(h.reshape(len(h), -1) @ w1 + b1, 0)
    expected = _softmax(h @ w2 + b2)
    probs = keras.ops.convert_to_numpy(model(x.astype("float32"),
                                             training=False))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: models.mnist_dense("article4"), ValueError, "article4"),
    (lambda: models.mnist_dense(batch_norm="yes"), TypeError, "'yes'"),
    (lambda: models.mnist_sigmoid(batch_norm=1), TypeError, "batch_norm=1"),
    (lambda: models.cifar10_conv(norm_layer="bn"), TypeError, "'bn'"),
])
def test_bad_arguments_are_named(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()

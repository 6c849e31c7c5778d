"""Tests for `keras_bn.convert`.

Every original model gets random moving statistics, gamma and beta first:
with the initial ones (0, 1, 1, 0) a batch-norm layer is nearly the
identity at inference and a wrong conversion could still predict the same.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.convert import convert
from tests.applications import INPUT_SHAPE
from tests.applications import application
from tests.bn_models import all_layers as _all_layers
from tests.bn_models import randomize_bn as _randomize_bn

_KERAS_BN = keras.layers.BatchNormalization


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _count(model, cls):
    return sum(type(layer) is cls for layer in _all_layers(model))


def _assert_same_predictions(original, converted, x, tol=1e-6):
    expected = _np(original(x, training=False))
    got = _np(converted(x, training=False))
    # Inference normalizations differ only in rounding; the tolerance is
    # relative to the outputs' scale.
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol * scale)
    return expected


def _nested_model():
    inner = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(8, activation="relu"),
        _KERAS_BN(momentum=0.9, epsilon=1e-2, name="inner_bn"),
    ], name="inner")
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, name="d1")(inputs)
    h = _KERAS_BN(center=False, name="outer_bn")(h)
    h = inner(h)
    shared = keras.layers.Dense(8, activation="tanh", name="shared")
    h = shared(shared(h))
    h = keras_bn.BatchNormalization(name="ours")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def test_nested_functional_model_converts_with_weights_and_configs():
    model = _nested_model()
    model.get_layer("inner").get_layer("inner_bn").trainable = False
    _randomize_bn(model)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    converted = convert(model)
    assert _count(converted, _KERAS_BN) == 0
    assert _count(converted, keras_bn.BatchNormalization) == 3
    assert _count(model, _KERAS_BN) == 2  # the original is untouched
    _assert_same_predictions(model, converted, x)
    inner_bn = converted.get_layer("inner").get_layer("inner_bn")
    assert isinstance(inner_bn, keras_bn.BatchNormalization)
    assert (inner_bn.momentum, inner_bn.epsilon) == (0.9, 1e-2)
    assert not inner_bn.trainable
    assert converted.get_layer("outer_bn").center is False
    assert [layer.name for layer in _all_layers(converted)] == [
        layer.name for layer in _all_layers(model)]
    # A layer shared in the original is shared in the copy.
    assert len(converted.get_layer("shared")._inbound_nodes) == 2
    # The copy owns its weights.
    converted.get_layer("d1").kernel.assign(
        np.zeros((6, 8), dtype="float32"))
    assert np.abs(_np(model.get_layer("d1").kernel)).sum() > 0


def test_sequential_built_by_a_call_and_frozen_model():
    model = keras.Sequential([
        keras.layers.Conv2D(4, 3),
        _KERAS_BN(axis=1),  # normalizes the rows, not the channels
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(2),
    ])
    x = np.random.default_rng(2).normal(size=(3, 7, 7, 2)).astype("float32")
    model(x)
    model.trainable = False
    _randomize_bn(model)
    converted = convert(model)
    bn = converted.layers[1]
    assert isinstance(bn, keras_bn.BatchNormalization)
    assert bn.axis == 1 and tuple(bn.moving_mean.shape) == (5,)
    assert not converted.trainable and not bn.trainable
    _assert_same_predictions(model, converted, x)


def test_frozen_functional_model_stays_frozen():
    model = _nested_model()
    model.trainable = False
    model.get_layer("head").trainable = True  # set after the model's flag
    converted = convert(model)
    assert not converted.trainable
    assert converted.get_layer("head").trainable
    assert not converted.get_layer("inner").get_layer("inner_bn").trainable


def test_dtype_policy_carries_over():
    inputs = keras.Input((4,), dtype="float64")
    outputs = _KERAS_BN(dtype="float64")(inputs)
    model = keras.Model(inputs, outputs)
    _randomize_bn(model)
    converted = convert(model)
    bn = converted.layers[1]
    assert bn.dtype_policy.name == "float64"
    assert bn.moving_mean.dtype == "float64"
    x = np.random.default_rng(3).normal(size=(4, 4))
    _assert_same_predictions(model, converted, x)


@pytest.mark.parametrize("name, shape", [
    ("ResNet50", INPUT_SHAPE),
    ("MobileNetV2", INPUT_SHAPE),
])
def test_keras_applications(name, shape):
    # Built once per process, shared with test_fold (read only).
    model = application(name)
    x = np.random.default_rng(4).uniform(0, 1, (2,) + shape).astype(
        "float32")
    n_bn = _count(model, _KERAS_BN)
    assert n_bn > 50
    converted = convert(model)
    assert _count(converted, _KERAS_BN) == 0
    assert _count(converted, keras_bn.BatchNormalization) == n_bn
    logits = _assert_same_predictions(model, converted, x)
    assert np.std(logits) > 1e-3  # the comparison is not trivial


def test_overrides_apply_to_every_batch_norm_layer():
    model = _nested_model()
    _randomize_bn(model)
    converted = convert(model, synchronized=True, virtual_batch_size=32)
    layers = [layer for layer in _all_layers(converted)
              if isinstance(layer, keras_bn.BatchNormalization)]
    assert len(layers) == 3  # ours ("ours") included
    for layer in layers:
        config = layer.get_config()
        assert config["synchronized"] is True
        assert config["virtual_batch_size"] == 32
    # Neither changes inference.
    x = np.random.default_rng(5).normal(size=(4, 6)).astype("float32")
    _assert_same_predictions(model, converted, x)


def test_renorm_override_starts_from_the_moving_statistics():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, _KERAS_BN(name="bn")(inputs))
    _randomize_bn(model)
    bn = convert(model, renorm=True).get_layer("bn")
    variance = _np(model.layers[1].moving_variance)
    stddev = np.sqrt(variance + bn.epsilon)
    np.testing.assert_allclose(_np(bn.moving_variance), variance)
    np.testing.assert_allclose(_np(bn.moving_stddev), stddev, rtol=1e-6)
    np.testing.assert_allclose(_np(bn.renorm_stddev), stddev, rtol=1e-6)
    np.testing.assert_allclose(_np(bn.renorm_mean),
                               _np(model.layers[1].moving_mean))


def test_single_layer():
    layer = _KERAS_BN(epsilon=0.5)
    layer.build((None, 3))
    _randomize_bn(keras.Sequential([layer]))
    converted = convert(layer)
    assert isinstance(converted, keras_bn.BatchNormalization)
    assert converted.epsilon == 0.5
    for original, copy in zip(layer.weights, converted.weights):
        np.testing.assert_array_equal(_np(copy), _np(original))


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = _KERAS_BN()

    def call(self, x):
        return self.norm(x)


class _MyBN(_KERAS_BN):
    pass


def test_unconvertible_layers():
    inputs = keras.Input((3,))
    hidden = keras.Model(inputs, _Block(name="block")(inputs))
    with pytest.raises(TypeError, match="block"):
        convert(hidden)
    subclass = keras.Model(inputs, _MyBN(name="mine")(inputs))
    with pytest.warns(UserWarning, match="mine"):
        converted = convert(subclass)
    assert type(converted.get_layer("mine")) is _MyBN


def test_bad_overrides():
    model = _nested_model()
    with pytest.raises(TypeError, match="virtual_batchsize"):
        convert(model, virtual_batchsize=32)
    with pytest.raises(TypeError, match="'name'"):
        convert(model, name="bn")
    with pytest.raises(ValueError, match="virtual_batch_size=0"):
        convert(model, virtual_batch_size=0)
    with pytest.raises(TypeError, match="model="):
        convert("model")


def _ours_model():
    inputs = keras.Input((5, 5, 3), name="image")
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras_bn.BatchNormalization(momentum=0.9, skip_nonfinite_updates=False,
                                    fused=True, name="bn")(h)
    h = keras_bn.BatchNormalization(axis=[3], renorm=True,
                                    renorm_clipping={"rmax": 2.0},
                                    name="renorm")(h)
    h = keras_bn.BatchNormalization(data_format="channels_first",
                                    center=False, name="rows")(h)
    inner = keras.Sequential([keras.Input((3, 3, 4)),
                              keras_bn.BatchNormalization(name="inner_bn")],
                             name="inner")
    h = _KERAS_BN(epsilon=0.01, name="theirs")(inner(h))
    return keras.Model(inputs, keras.layers.Flatten()(h), name="ours")


def _weights(model):
    return {f"{path}/{v.name}": _np(v) for path, layer in (
        (layer.name, layer) for layer in _all_layers(model))
        for v in layer.weights}


def test_convert_to_keras_layer_and_back():
    model = _ours_model()
    _randomize_bn(model)
    x = np.random.default_rng(6).normal(size=(3, 5, 5, 3)).astype("float32")
    converted = convert(model, to=_KERAS_BN)
    assert _count(converted, keras_bn.BatchNormalization) == 0
    assert _count(converted, _KERAS_BN) == 5
    assert _count(model, keras_bn.BatchNormalization) == 4  # untouched
    rows = converted.get_layer("rows")
    assert (rows.axis, rows.center) == (1, False)
    renorm = converted.get_layer("renorm")
    assert renorm.axis == 3 and renorm.renorm
    assert renorm.renorm_clipping["rmax"] == 2.0
    assert converted.get_layer("bn").momentum == 0.9
    assert converted.get_layer("theirs").epsilon == 0.01
    assert converted.name == "ours"
    original = _weights(model)
    got = _weights(converted)
    assert list(got) == list(original)  # same names, same order
    for name in original:
        np.testing.assert_array_equal(got[name], original[name], name)
    _assert_same_predictions(model, converted, x)
    # And back again: identical weights.
    back = convert(converted)
    assert _count(back, _KERAS_BN) == 0
    for name, value in _weights(back).items():
        np.testing.assert_array_equal(value, original[name], name)
    # Overrides are Keras's arguments.
    frozen = convert(model, to=_KERAS_BN, momentum=0.5)
    assert {layer.momentum for layer in _all_layers(frozen)
            if isinstance(layer, _KERAS_BN)} == {0.5}


def test_convert_to_keras_layer_loads_without_keras_bn(tmp_path):
    import os
    import subprocess
    import sys

    model = _ours_model()
    _randomize_bn(model)
    converted = convert(model, to=_KERAS_BN)
    x = np.random.default_rng(7).normal(size=(2, 5, 5, 3)).astype("float32")
    path = str(tmp_path / "converted.keras")
    converted.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", _np(model(x, training=False)))
    child = (
        "import sys, numpy as np, keras\n"
        f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "y = keras.ops.convert_to_numpy(m(x, training=False))\n"
        f"e = np.load({str(tmp_path / 'y.npy')!r})\n"
        "np.testing.assert_allclose(y, e, rtol=0, atol=1e-6 * abs(e).max())\n"
        "assert 'keras_bn' not in sys.modules\n"
        "print('loaded')\n")
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run([sys.executable, "-c", child], env=env,
                            cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stdout


def test_convert_to_keras_layer_errors():
    inputs = keras.Input((4, 4, 2))
    grid = keras.Model(inputs, keras_bn.BatchNormalization(
        axis=[1, 2], name="grid")(inputs))
    with pytest.raises(ValueError, match="'grid'.*axis=\\[1, 2\\]"):
        convert(grid, to=_KERAS_BN)
    ghost = keras.Model(inputs, keras_bn.BatchNormalization(
        virtual_batch_size=2, name="ghost")(inputs))
    with pytest.raises(ValueError, match="'ghost'.*virtual_batch_size=2"):
        convert(ghost, to=_KERAS_BN)
    # The suggested way out works.
    plain = convert(convert(ghost, virtual_batch_size=None), to=_KERAS_BN)
    assert type(plain.get_layer("ghost")) is _KERAS_BN
    with pytest.raises(TypeError, match="virtual_batch_size"):
        convert(ghost, to=_KERAS_BN, virtual_batch_size=None)
    hosts = keras.Model(inputs, keras_bn.BatchNormalization(
        synchronized=True, synchronized_group_size=8, name="hosts")(inputs))
    with pytest.raises(ValueError,
                       match="'hosts'.*synchronized_group_size=8"):
        convert(hosts, to=_KERAS_BN)
    # The way out (Keras's layer synchronizes on TensorFlow only).
    keep = keras.backend.backend() == "tensorflow"
    synced = convert(convert(hosts, synchronized=keep,
                             synchronized_group_size=None),
                     to=_KERAS_BN).get_layer("hosts")
    assert type(synced) is _KERAS_BN and synced.synchronized is keep
    with pytest.raises(TypeError, match="to="):
        convert(ghost, to=keras.layers.LayerNormalization)
    with pytest.raises(TypeError, match="to="):
        convert(ghost, to="keras")

"""Tests for `keras_bn.fold`.

Batch-norm layers get random moving statistics, gamma and beta first: with
the initial ones (0, 1, 1, 0) folding is nearly the identity and a wrong
fold could still predict the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.fold import FoldReport
from tests.applications import application
from tests.bn_models import BN_CLASSES as _BNS
from tests.bn_models import all_layers as _layers
from tests.bn_models import layer_paths as _paths
from tests.bn_models import randomize_bn as _randomize_bn

L = keras.layers


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _bn_count(model):
    return sum(isinstance(layer, _BNS) for layer in _layers(model))


def _assert_close(original, folded, x, tol=1e-5):
    expected = _np(original(x, training=False))
    got = _np(folded(x, training=False))
    scale = float(np.abs(expected).max())
    assert scale > 1e-3  # not a trivial comparison
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol * scale)


def _x(shape, seed=1):
    return np.random.default_rng(seed).normal(size=(2,) + shape).astype(
        "float32")


def _layer_zoo():
    """Every foldable layer kind, each followed by a batch-norm layer, and
    batch-norm layers that cannot be folded (with the reason's words)."""
    inputs = keras.Input((9, 9, 3), name="image")
    h = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = keras_bn.BatchNormalization(name="bn_conv")(h)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(h)
    h = L.BatchNormalization(name="bn_dw")(h)
    h = L.SeparableConv2D(5, 3, depth_multiplier=2, name="sep")(h)
    h = keras_bn.BatchNormalization(name="bn_sep", renorm=True)(h)
    h = L.Conv2DTranspose(3, 3, strides=2, name="tr")(h)
    h = keras_bn.BatchNormalization(name="bn_tr", center=False)(h)
    a = L.Conv2D(3, 1, activation="relu", name="relu_conv")(h)
    a = keras_bn.BatchNormalization(name="bn_after_relu")(a)
    b = L.Conv2D(3, 1, name="twice")(a)
    c = keras_bn.BatchNormalization(name="bn_of_used_twice")(b)
    h = L.Add(name="add")([a, b, c, h])
    h = keras_bn.BatchNormalization(name="bn_after_add", scale=False)(h)
    h = L.Reshape((7 * 7, 3))(h)
    h = L.EinsumDense("abc,cd->abd", (49, 4), name="ein")(h)
    h = keras_bn.BatchNormalization(name="bn_ein")(h)
    h = L.EinsumDense("abc,cd->abd", (49, 4), bias_axes="d",
                      name="ein_rows")(h)
    h = L.BatchNormalization(axis=1, name="bn_ein_rows")(h)
    h = L.Flatten()(h)
    h = L.Dense(5, name="dense")(h)
    outputs = L.BatchNormalization(name="bn_dense")(h)
    model = keras.Model(inputs, outputs, name="zoo")
    not_folded = {
        "bn_after_relu": "activation 'relu'",
        "bn_of_used_twice": "also feeds",
        "bn_after_add": "'add' (Add), which has no kernel",
        "bn_ein_rows": "not an output axis of the kernel",
    }
    return _randomize_bn(model), not_folded


def _check_report(report, model, folded, not_folded):
    assert isinstance(report, FoldReport)
    assert set(report.not_folded) == set(not_folded)
    for name, words in not_folded.items():
        assert words in report.not_folded[name], report.not_folded[name]
    names = {path for path, layer in _paths(model) if isinstance(layer, _BNS)}
    assert set(report.folded) == names - set(not_folded)
    # What is left is Keras's layer only.
    assert _bn_count(folded) == len(not_folded)
    assert not any(isinstance(layer, keras_bn.BatchNormalization)
                   for layer in _layers(folded))


def test_functional_layer_zoo():
    model, not_folded = _layer_zoo()
    folded, report = keras_bn.fold(model, return_report=True)
    _check_report(report, model, folded, not_folded)
    assert report.folded["bn_conv"] == "conv"
    assert report.folded["bn_ein"] == "ein"
    assert folded.name == "zoo"
    assert folded.get_layer("conv").use_bias
    assert folded.get_layer("ein").bias_axes == "d"
    _assert_close(model, folded, _x((9, 9, 3)))
    assert 0 <= report.max_rel_diff < 1e-5
    assert report.max_abs_diff > 0  # float32 rounding differs somewhere


@pytest.mark.parametrize("conv, shape", [
    (L.Conv1D(4, 3, name="p"), (10, 3)),
    (L.Conv3D(4, 2, name="p"), (5, 5, 5, 2)),
    (L.Conv1DTranspose(4, 3, name="p"), (10, 3)),
    (L.DepthwiseConv1D(3, depth_multiplier=3, use_bias=False, name="p"),
     (10, 2)),
    (L.SeparableConv1D(4, 3, name="p"), (10, 3)),
    (L.Conv2D(4, 3, data_format="channels_first", name="p"), (3, 7, 7)),
    (L.Conv2DTranspose(4, 3, data_format="channels_first", name="p"),
     (3, 5, 5)),
])
def test_sequential_one_kind_at_a_time(conv, shape):
    axis = 1 if conv.data_format == "channels_first" else -1
    model = _randomize_bn(keras.Sequential([
        keras.Input(shape), conv, keras_bn.BatchNormalization(axis=axis),
        L.BatchNormalization(axis=axis),  # folds after the first one
    ], name="seq"))
    folded, report = keras_bn.fold(model, return_report=True)
    assert _bn_count(folded) == 0
    assert list(report.folded.values()) == ["p", "p"]
    assert [type(layer) for layer in folded.layers] == [type(conv)]
    _assert_close(model, folded, _x(shape))


def test_fold_math_against_float64_numpy():
    """Conv2D -> BN -> Flatten -> Dense(no bias) -> BN, by hand in float64."""
    model = _randomize_bn(keras.Sequential([
        keras.Input((5, 5, 2)),
        L.Conv2D(3, 2, name="conv"),
        keras_bn.BatchNormalization(epsilon=0.1, name="bn1"),
        L.Flatten(),
        L.Dense(4, use_bias=False, name="dense"),
        L.BatchNormalization(epsilon=0.01, name="bn2"),
    ]))
    rng = np.random.default_rng(2)
    conv = model.get_layer("conv")
    conv.bias.assign(rng.normal(size=3).astype("float32"))
    x = _x((5, 5, 2))

    def f64(variable):
        return _np(variable).astype("float64")

    def bn(h, layer):
        return (f64(layer.gamma) * (h - f64(layer.moving_mean))
                / np.sqrt(f64(layer.moving_variance) + layer.epsilon)
                + f64(layer.beta))

    kernel = f64(conv.kernel)  # (2, 2, in, out), valid, stride 1
    h = np.zeros((2, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            patch = x[:, i:i + 2, j:j + 2, :].astype("float64")
            h[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel)
    h = bn(h + f64(conv.bias), model.get_layer("bn1")).reshape(2, -1)
    expected = bn(h @ f64(model.get_layer("dense").kernel),
                  model.get_layer("bn2"))

    folded = keras_bn.fold(model)
    assert _bn_count(folded) == 0
    got = _np(folded(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_keras_applications_fold_completely(name):
    # Built once per process, shared with test_convert (read only).
    model = application(name)
    n_bn = _bn_count(model)
    assert n_bn > 30
    folded, report = keras_bn.fold(model, return_report=True)
    assert report.not_folded == {}
    assert len(report.folded) == n_bn
    assert _bn_count(folded) == 0
    x = np.random.default_rng(4).uniform(0, 1, (2, 32, 32, 3)).astype(
        "float32")
    _assert_close(model, folded, x)


def test_nested_and_shared_layers():
    inner = keras.Sequential([
        keras.Input((6,)),
        keras_bn.BatchNormalization(name="inner_first"),  # input from outside
        L.Dense(6, name="inner_dense"),
        keras_bn.BatchNormalization(name="inner_bn"),
    ], name="inner")
    inputs = keras.Input((6,), name="x")
    h = keras_bn.BatchNormalization(name="bn_input")(inputs)
    shared = L.Dense(6, name="shared")
    h = L.BatchNormalization(name="bn_shared")(shared(h))
    h = shared(h)
    h = inner(h)
    h = keras_bn.BatchNormalization(name="bn_nested")(h)
    model = _randomize_bn(keras.Model(inputs, h, name="outer"))
    folded, report = keras_bn.fold(model, return_report=True)
    _check_report(report, model, folded, {
        "bn_input": "input of the model",
        "bn_shared": "shared",
        "inner/inner_first": "input of the nested model 'inner'",
        "bn_nested": "nested model 'inner'",
    })
    assert report.folded == {"inner/inner_bn": "inner/inner_dense"}
    assert [layer.name for layer in folded.get_layer("inner").layers] == [
        "inner_first", "inner_dense"]
    _assert_close(model, folded, _x((6,)))


def test_options_and_axes():
    # keras_bn with several axes, folded into an EinsumDense whose kernel
    # holds both; and Keras's layer kept when asked.
    inputs = keras.Input((4, 3))
    h = L.EinsumDense("abc,bcd->abd", (4, 5), name="ein")(inputs)
    h = keras_bn.BatchNormalization(axis=[1, 2], name="bn_2d")(h)
    h = L.Dense(5, name="dense")(h)
    h = L.BatchNormalization(name="keras_bn_layer")(h)
    h = L.Dense(5, name="dense_2")(h)
    h = keras_bn.BatchNormalization(axis=1, virtual_batch_size=2,
                                    name="wrong_axis")(h)
    model = _randomize_bn(keras.Model(inputs, h))
    folded, report = keras_bn.fold(model, include_keras_layers=False,
                                   return_report=True)
    _check_report(report, model, folded, {
        "keras_bn_layer": "include_keras_layers=False",
        "wrong_axis": "axis 1 is not the channel axis 2",
    })
    assert folded.get_layer("ein").bias_axes == "bd"
    assert folded.get_layer("wrong_axis").get_config()["axis"] == 1
    _assert_close(model, folded, _x((4, 3)))

    # Several axes that cannot be folded have no Keras equivalent.
    model = keras.Sequential([keras.Input((4, 4, 2)), L.ReLU(),
                              keras_bn.BatchNormalization(axis=[1, 2],
                                                          name="grid")])
    with pytest.raises(ValueError, match="'grid'.*axis=\\[1, 2\\]"):
        keras_bn.fold(model)


def test_original_model_is_unchanged():
    model, _ = _layer_zoo()
    x = _x((9, 9, 3))
    before = [_np(w).copy() for w in model.weights]
    prediction = _np(model(x, training=False))
    config = model.get_config()
    keras_bn.fold(model)
    assert model.get_config() == config
    for w, value in zip(model.weights, before):
        np.testing.assert_array_equal(_np(w), value)
    np.testing.assert_array_equal(_np(model(x, training=False)), prediction)


def test_folded_model_loads_without_keras_bn(tmp_path):
    model, _ = _layer_zoo()
    folded = keras_bn.fold(model)
    x = _x((9, 9, 3))
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", _np(folded(x, training=False)))
    child = textwrap.dedent(f"""
        import sys
        import numpy as np
        import keras
        model = keras.saving.load_model({path!r}, safe_mode=True)
        x = np.load({str(tmp_path / "x.npy")!r})
        y = keras.ops.convert_to_numpy(model(x, training=False))
        np.testing.assert_allclose(y, np.load({str(tmp_path / "y.npy")!r}),
                                   rtol=0, atol=1e-6)
        assert "keras_bn" not in sys.modules, "keras_bn was imported"
        print("loaded", keras.backend.backend())
    """)
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run([sys.executable, "-c", child], env=env,
                            cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {keras.backend.backend()}" in result.stdout


def test_probe_data():
    inputs = [keras.Input((3,), name="a"), keras.Input((3,), name="b")]
    h = L.Dense(3, name="d")(L.Concatenate()(inputs))
    model = _randomize_bn(keras.Model(
        inputs, keras_bn.BatchNormalization()(h)))
    data = (_x((3,)), _x((3,), seed=2))
    _, report = keras_bn.fold(model, data=data, return_report=True)
    expected = _np(model(list(data), training=False))
    assert report.max_abs_diff <= 1e-5 * np.abs(expected).max()
    with pytest.raises(ValueError, match="`data` must match"):
        keras_bn.fold(model, data=_x((3,)))
    with pytest.raises(TypeError, match="`data` must be a NumPy array"):
        keras_bn.fold(model, data="batch")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)
        self.norm = keras_bn.BatchNormalization()

    def call(self, x):
        return self.norm(self.dense(x))


class _Block(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = L.BatchNormalization()

    def call(self, x):
        return self.norm(x)


def test_bad_arguments():
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="Sequential and functional"):
        keras_bn.fold(subclassed)
    inputs = keras.Input((3,))
    with pytest.raises(TypeError, match="block"):
        keras_bn.fold(keras.Model(inputs, _Block(name="block")(inputs)))
    model = keras.Sequential([L.Dense(3), keras_bn.BatchNormalization()])
    with pytest.raises(ValueError, match="built"):
        keras_bn.fold(model)
    model.build((None, 3))
    with pytest.raises(TypeError, match="include_keras_layers='yes'"):
        keras_bn.fold(model, include_keras_layers="yes")
    with pytest.raises(TypeError, match="return_report=1"):
        keras_bn.fold(model, return_report=1)
    with pytest.raises(TypeError, match="model='model'"):
        keras_bn.fold("model")

"""Tests for `keras_bn.recalibrate`.

References are float64 NumPy statistics of the inputs each layer receives,
extracted independently of `recalibrate` (sub-models or layer-by-layer
calls), never values produced by the code under test.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.recalibrate import recalibrate

_BN_TYPES = (keras.layers.BatchNormalization, keras_bn.BatchNormalization)
_MOVING = ("moving_mean", "moving_variance", "moving_stddev")


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def _bn_layers(model):
    return [layer for layer in model._flatten_layers()
            if isinstance(layer, _BN_TYPES)]


def _reduction_axes(layer, rank):
    axis = layer.axis if isinstance(layer.axis, list) else [layer.axis]
    features = {a % rank for a in axis}
    return tuple(i for i in range(rank) if i not in features)


def _assert_stats(layer, inputs, tol=1e-4):
    """The layer's moving statistics are the float64 ones of `inputs`."""
    inputs = _np(inputs)
    axes = _reduction_axes(layer, inputs.ndim)
    np.testing.assert_allclose(_np(layer.moving_mean),
                               inputs.mean(axis=axes), rtol=tol, atol=tol)
    np.testing.assert_allclose(_np(layer.moving_variance),
                               inputs.var(axis=axes), rtol=tol, atol=tol)


def _snapshot(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v))
            for v in model.weights}


def _assert_only_moving_stats_changed(model, before):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    changed = set()
    for path, value in before.items():
        if not np.array_equal(value, after[path]):
            changed.add(path)
            assert path.rsplit("/", 1)[-1] in _MOVING, path
    assert changed, "recalibrate changed no moving statistic"


def _ramp_data(n, features, offset=1000.0, seed=0):
    """Unshuffled data whose batches have very different means, with a large
    common offset: averaging batch means or variances, or forming
    E[x^2] - E[x]^2 in float32, misses the pooled statistics."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 20.0, n)[:, None]
    x = offset + ramp + rng.normal(size=(n, features)) * np.linspace(
        0.5, 2.0, features)
    return x.astype("float32")


def _dense_model():
    inputs = keras.Input((6,))
    h = keras_bn.BatchNormalization(name="bn_in", momentum=0.5)(inputs)
    h = keras.layers.Dense(8, activation="relu", name="d1")(h)
    h = keras.layers.BatchNormalization(name="bn_mid")(h)
    h = keras.layers.Dense(5, name="d2")(h)
    h = keras_bn.BatchNormalization(name="bn_out", renorm=True)(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _layer_inputs(model, x):
    """Each batch-norm layer's inputs, all layers in inference mode."""
    layers = _bn_layers(model)
    probe = keras.Model(model.input, [layer.input for layer in layers])
    return layers, probe(x, training=False)


def test_inference_mode_matches_pooled_float64_statistics():
    model = _dense_model()
    x = _ramp_data(203, 6)
    model(x[:2])
    before = _snapshot(model)
    assert recalibrate(model, x, batch_size=50, verbose=0) is model
    _assert_only_moving_stats_changed(model, before)
    # After recalibration, the inference-mode inputs of each layer are what
    # it saw: its upstream layers were recalibrated before it.
    for layer, inputs in zip(*_layer_inputs(model, x)):
        _assert_stats(layer, inputs)
    renorm = model.get_layer("bn_out")
    np.testing.assert_allclose(
        _np(renorm.moving_stddev),
        np.sqrt(_np(renorm.moving_variance) + renorm.epsilon), rtol=1e-6)


def test_conv_layers_reduce_over_their_own_axes():
    inputs = keras.Input((6, 5, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras_bn.BatchNormalization(name="per_channel")(h)
    h = keras.layers.BatchNormalization(axis=1, name="per_row")(h)
    h = keras_bn.BatchNormalization(axis=[1, 3], name="per_row_channel")(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(40, 6, 5, 3)) * 3 + 7).astype("float32")
    before = _snapshot(model)
    recalibrate(model, x, batch_size=16, verbose=0)
    _assert_only_moving_stats_changed(model, before)
    layers, layer_inputs = _layer_inputs(model, x)
    assert [tuple(layer.moving_mean.shape) for layer in layers] == [
        (4,), (6,), (6, 4)]
    for layer, inputs in zip(layers, layer_inputs):
        _assert_stats(layer, inputs)


def test_train_mode_uses_batch_statistics_upstream():
    model = _dense_model()
    x = _ramp_data(120, 6)
    model(x[:2])
    # Reference: a copy run in training mode, batch by batch (its moving
    # averages change, which training-mode outputs never read).
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    layers = _bn_layers(twin)
    probe = keras.Model(twin.input, [layer.input for layer in layers])
    batches = [probe(x[i:i + 40], training=True) for i in range(0, 120, 40)]
    before = _snapshot(model)
    recalibrate(model, x, batch_size=40, mode="train", verbose=0)
    _assert_only_moving_stats_changed(model, before)
    for index, layer in enumerate(_bn_layers(model)):
        inputs = np.concatenate([_np(b[index]) for b in batches])
        _assert_stats(layer, inputs)
    # Upstream batch statistics make the later layers' inputs differ from
    # the inference-mode ones (the modes are really different).
    _, inference_inputs = _layer_inputs(model, x)
    assert not np.allclose(_np(inference_inputs[1]).var(axis=0),
                           _np(model.get_layer("bn_mid").moving_variance),
                           rtol=1e-3)


class _Residual(keras.Model):
    """A subclassed model calling its batch-norm layer in its own code."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=False):
        return x + self.norm(self.dense(x), training=training)


def test_nested_sequential_and_subclassed_models():
    inner = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(4, activation="tanh"),
        keras_bn.BatchNormalization(),
    ], name="inner")
    residual = _Residual()
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = inner(h)
    outputs = residual(h)
    model = keras.Model(inputs, outputs)
    x = (np.random.default_rng(2).normal(size=(70, 3)) * 2 + 3).astype(
        "float32")
    before = _snapshot(model)
    recalibrate(model, x, batch_size=32, verbose=0)
    _assert_only_moving_stats_changed(model, before)
    # Layer-by-layer inputs in inference mode.
    dense, outer_bn = model.layers[1], model.layers[2]
    h0 = dense(x)
    _assert_stats(outer_bn, h0)
    h1 = outer_bn(h0, training=False)
    pre_inner = inner.layers[0](h1)
    _assert_stats(inner.layers[1], pre_inner)
    h2 = inner(h1, training=False)
    _assert_stats(residual.norm, residual.dense(h2))


def test_masked_inputs_count_only_unmasked_steps():
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 1]] * 6)
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 3, mask_zero=True)(inputs)
    h = keras_bn.BatchNormalization(name="ours")(h)
    h = keras.layers.BatchNormalization(name="theirs")(h)
    model = keras.Model(inputs, h)
    recalibrate(model, tokens, batch_size=4, verbose=0)
    keep = tokens != 0
    embedded = _np(model.layers[1](tokens))
    ours = model.get_layer("ours")
    _assert_stats(ours, embedded[keep])
    normalized = _np(ours(embedded, training=False))
    _assert_stats(model.get_layer("theirs"), normalized[keep])


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, batch_size, infinite=False):
        super().__init__()
        self.x, self.batch_size, self.infinite = x, batch_size, infinite

    @property
    def num_batches(self):
        return None if self.infinite else -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        index %= -(-len(self.x) // self.batch_size)
        batch = self.x[index * self.batch_size:(index + 1) * self.batch_size]
        return batch, np.zeros(len(batch))


def _data_forms(x):
    import tensorflow as tf

    labels = np.zeros(len(x))
    return {
        "tf.data": tf.data.Dataset.from_tensor_slices((x, labels)).batch(30),
        "PyDataset": _Batches(x, 30),
        "generator": ((x[i:i + 30], labels[i:i + 30])
                      for i in range(0, len(x), 30)),
        "list": [(x[i:i + 30],) for i in range(0, len(x), 30)],
    }


@pytest.mark.parametrize("form", ["tf.data", "PyDataset", "generator", "list"])
def test_data_forms(form):
    x = _ramp_data(100, 6)
    model = _dense_model()
    recalibrate(model, _data_forms(x)[form], verbose=0)
    for layer, inputs in zip(*_layer_inputs(model, x)):
        _assert_stats(layer, inputs)


def test_steps_limits_batches_and_infinite_data_needs_steps():
    x = _ramp_data(100, 6)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras_bn.BatchNormalization()(inputs))
    with pytest.raises(ValueError, match="steps"):
        recalibrate(model, _Batches(x, 30, infinite=True), verbose=0)
    recalibrate(model, _Batches(x, 30, infinite=True), steps=2, verbose=0)
    _assert_stats(model.layers[1], x[:60])
    recalibrate(model, x, steps=3, batch_size=20, verbose=0)
    _assert_stats(model.layers[1], x[:60])


def test_progress_bar(capsys):
    x = _ramp_data(64, 6)
    model = _dense_model()
    recalibrate(model, x, batch_size=16, verbose=0)
    assert capsys.readouterr().out == ""
    recalibrate(model, x, batch_size=16)
    # Three layers, one pass each, four batches per pass.
    assert "12/12" in capsys.readouterr().out


def test_bad_arguments():
    x = _ramp_data(10, 6)
    model = _dense_model()
    no_bn = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no batch normalization"):
        recalibrate(no_bn, x)
    with pytest.raises(TypeError, match="model="):
        recalibrate("model", x)
    for empty in ([], iter(()), x[:0]):
        with pytest.raises(ValueError, match="no batch"):
            recalibrate(model, empty, verbose=0)
    with pytest.raises(ValueError, match="steps=0"):
        recalibrate(model, x, steps=0)
    for steps in (1.5, True):
        with pytest.raises(TypeError, match="steps="):
            recalibrate(model, x, steps=steps)
    with pytest.raises(ValueError, match="mode='eval'"):
        recalibrate(model, x, mode="eval")
    with pytest.raises(ValueError, match="batch_size=8"):
        recalibrate(model, [x], batch_size=8)
    with pytest.raises(TypeError, match="data=5"):
        recalibrate(model, 5)
    with pytest.raises(ValueError, match="verbose=3"):
        recalibrate(model, x, verbose=3)


def _accuracy(model, x, y, training=False, batch_size=500):
    hits = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size], training=training)
        hits += int(np.sum(np.argmax(_np(logits), axis=-1) ==
                           y[i:i + batch_size]))
    return hits / len(x)


def test_bad_momentum_model_recovers_its_accuracy():
    from keras_bn import datasets

    (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    x_train = x_train[:10000].reshape(-1, 784).astype("float32") / 255
    y_train = y_train[:10000]
    x_test = x_test[:2000].reshape(-1, 784).astype("float32") / 255
    y_test = y_test[:2000]
    # The paper's MNIST network (three sigmoid layers of 100 units, batch
    # norm before each nonlinearity), with momentum=0.9999: after 100 steps
    # the moving statistics are still 99% their initial (0, 1), so at
    # inference each layer feeds mis-scaled, mis-centred pre-activations to
    # a saturating sigmoid, and the errors compound over the three layers.
    def block(norm):
        return [keras.layers.Dense(100), norm(momentum=0.9999),
                keras.layers.Activation("sigmoid")]

    model = keras.Sequential(
        [keras.Input((784,))]
        + block(keras_bn.BatchNormalization)
        + block(keras.layers.BatchNormalization)
        + block(keras_bn.BatchNormalization)
        + [keras.layers.Dense(10)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(x_train, y_train, batch_size=100, epochs=1, verbose=0)
    stale = _accuracy(model, x_test, y_test)
    recalibrate(model, x_train, batch_size=1000, verbose=0)
    recalibrated = _accuracy(model, x_test, y_test)
    # What the trained weights achieve with the statistics they were trained
    # with, batch statistics of batches of 100 (measured last: it moves the
    # moving averages by 1e-4 of the way).
    batch_stats = _accuracy(model, x_test, y_test, training=True,
                            batch_size=100)
    assert batch_stats > 0.8, batch_stats  # 100 Adam steps do learn MNIST
    assert stale < batch_stats - 0.25, (stale, batch_stats)  # useless stats
    # Population statistics of 10,000 images are at least as good as those
    # of batches of 100; 0.02 covers the noise of 2,000 test images (the
    # standard error of an accuracy near 0.87 is about 0.0075).
    assert recalibrated > batch_stats - 0.02, (recalibrated, batch_stats)

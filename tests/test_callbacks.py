"""keras_bn.callbacks.ActivationPercentiles against a float64 NumPy reference.

The reference recomputes the recorded layer input in NumPy from snapshots of
the weights taken at the same training steps, and the percentiles by hand
(linear interpolation between order statistics, the documented definition).
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.callbacks import ActivationPercentiles

EPS = 1e-3


def _percentiles(values, qs):
    """Linear interpolation between sorted values at rank q/100 * (n - 1)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    out = []
    for q in qs:
        rank = q / 100.0 * (len(v) - 1)
        lo = int(np.floor(rank))
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (rank - lo) * (v[hi] - v[lo]))
    return np.array(out)


class _Snapshots(keras.callbacks.Callback):
    """Copies of the model's weights before training and every `every` batches."""

    def __init__(self, every):
        super().__init__()
        self.every, self.step, self.weights = every, 0, []

    def _take(self):
        self.weights.append({
            (layer.name, w.name): np.array(keras.ops.convert_to_numpy(w.value),
                                           dtype=np.float64)
            for layer in self.model.layers for w in layer.weights})

    def on_train_begin(self, logs=None):
        self._take()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self._take()


def _data(n=64, features=6, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, (n, features)).astype("float32")
    y = rng.integers(0, 3, n)
    return x, y


def _dense_model(batch_norm):
    layers = [keras.Input((6,)),
              keras.layers.Dense(5, use_bias=not batch_norm, name="hidden")]
    if batch_norm:
        layers.append(keras_bn.BatchNormalization(epsilon=EPS, momentum=0.5,
                                                  name="bn"))
    layers += [keras.layers.Activation("sigmoid", name="sigmoid"),
               keras.layers.Dense(3, activation="softmax", name="out")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


def _fit(model, x, y, callbacks, epochs=2):
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=callbacks)


def test_dense_input_percentiles_over_training():
    x, y = _data()
    model = _dense_model(batch_norm=False)
    qs = (15, 50, 85)
    recorder = ActivationPercentiles("sigmoid", data=x[:40], percentiles=qs,
                                     every=3, unit=2)
    snaps = _Snapshots(every=3)
    _fit(model, x, y, [recorder, snaps])
    # 64 examples / batch 8 = 8 batches per epoch, 16 in all.
    np.testing.assert_array_equal(recorder.steps, [0, 3, 6, 9, 12, 15])
    assert recorder.values.shape == (6, 3)
    expected = []
    for snap in snaps.weights:
        h = x[:40].astype(np.float64) @ snap["hidden", "kernel"]
        h += snap["hidden", "bias"]
        expected.append(_percentiles(h[:, 2], qs))
    np.testing.assert_allclose(recorder.values, expected, rtol=1e-5, atol=1e-5)
    # Training changed the distribution, so the records are not all alike.
    assert np.ptp(recorder.values[:, 1]) > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_output_percentiles(training):
    x, y = _data()
    model = _dense_model(batch_norm=True)
    qs = (0, 37.5, 100)
    recorder = ActivationPercentiles(model.get_layer("sigmoid"), data=x[:40],
                                     percentiles=qs, every=5, unit=4,
                                     training=training, batch_size=16)
    snaps = _Snapshots(every=5)
    _fit(model, x, y, [recorder, snaps])
    expected = []
    for snap in snaps.weights:
        h = x[:40].astype(np.float64) @ snap["hidden", "kernel"]
        gamma, beta = snap["bn", "gamma"], snap["bn", "beta"]
        if training:  # each chunk of 16 (16, 16, 8) uses its own statistics
            chunks = [h[i:i + 16] for i in range(0, 40, 16)]
            xhat = np.concatenate([(c - c.mean(0)) / np.sqrt(c.var(0) + EPS)
                                   for c in chunks])
        else:
            mean = snap["bn", "moving_mean"]
            var = snap["bn", "moving_variance"]
            xhat = (h - mean) / np.sqrt(var + EPS)
        expected.append(_percentiles((gamma * xhat + beta)[:, 4], qs))
    np.testing.assert_allclose(recorder.values, expected, rtol=1e-5, atol=1e-5)


def test_recording_leaves_the_training_unchanged():
    x, y = _data()
    results = []
    for callbacks in ([], [ActivationPercentiles("sigmoid", data=x, every=1,
                                                 training=True, batch_size=8)]):
        keras.utils.set_random_seed(0)
        model = _dense_model(batch_norm=True)
        _fit(model, x, y, callbacks)
        results.append([keras.ops.convert_to_numpy(w.value)
                        for w in model.weights])
    for with_recorder, without in zip(*results):
        np.testing.assert_array_equal(with_recorder, without)


@pytest.mark.parametrize("unit", [1, None])
def test_image_input_pools_examples_and_pixels(unit):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5, 4, 3)).astype("float32")
    y = rng.integers(0, 2, 12)
    model = keras.Sequential([
        keras.Input((5, 4, 3)),
        keras.layers.Conv2D(2, 3, name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(2, activation="softmax", name="out"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    qs = (10, 90)
    recorder = ActivationPercentiles("conv", data=x, percentiles=qs, every=2,
                                     unit=unit, batch_size=5)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[recorder])
    pooled = x.ravel() if unit is None else x[..., unit]
    np.testing.assert_array_equal(recorder.steps, [0, 2])
    np.testing.assert_allclose(recorder.values, [_percentiles(pooled, qs)] * 2,
                               rtol=1e-6, atol=1e-6)


def test_records_start_afresh_each_fit():
    x, y = _data()
    model = _dense_model(batch_norm=True)
    recorder = ActivationPercentiles("bn", data=x, every=4)
    _fit(model, x, y, [recorder], epochs=1)
    _fit(model, x, y, [recorder], epochs=1)
    np.testing.assert_array_equal(recorder.steps, [0, 4, 8])


@pytest.mark.parametrize("kwargs, error, words", [
    ({"layer": 3}, TypeError, "layer=3"),
    ({"data": None}, ValueError, "data=None"),
    ({"percentiles": ()}, ValueError, "percentiles=()"),
    ({"percentiles": (15, 101)}, ValueError, "percentiles=(15, 101)"),
    ({"percentiles": (-1,)}, ValueError, "percentiles=(-1,)"),
    ({"percentiles": "15"}, TypeError, "percentiles='15'"),
    ({"percentiles": (True,)}, TypeError, "percentiles=(True,)"),
    ({"every": 0}, ValueError, "every=0"),
    ({"every": 2.0}, TypeError, "every=2.0"),
    ({"unit": -1}, ValueError, "unit=-1"),
    ({"batch_size": 0}, ValueError, "batch_size=0"),
    ({"training": "yes"}, TypeError, "training='yes'"),
    ({"data": [np.zeros((3, 6)), np.zeros((4, 6))]}, ValueError, "[3, 4]"),
])
def test_bad_arguments_raise_early(kwargs, error, words):
    args = {"layer": "sigmoid", "data": np.zeros((3, 6), "float32"), **kwargs}
    with pytest.raises(error, match=None) as info:
        ActivationPercentiles(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"layer": "sigmoid_9"}, ["layer='sigmoid_9'", "hidden", "sigmoid"]),
    ({"layer": keras.layers.Activation("relu", name="stray")},
     ["'stray'", "not a top-level layer"]),
    ({"unit": 5}, ["unit=5", "(None, 5)"]),
])
def test_bad_layer_or_unit_raise_when_training_starts(kwargs, words):
    x, y = _data(n=8)
    model = _dense_model(batch_norm=False)
    recorder = ActivationPercentiles(**{"layer": "sigmoid", "data": x, **kwargs})
    with pytest.raises(ValueError) as info:
        _fit(model, x, y, [recorder], epochs=1)
    for word in words:
        assert word in str(info.value)

"""keras_bn.callbacks.RecalibrateStatistics (issue 16, section 3): after `fit`
with `use_ema=True` the statistics match the final (averaged) weights; with
`every_epoch=True` they match each epoch's weights. The reference recomputes
every batch-norm layer's inputs in float64 NumPy from the weights."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.callbacks import RecalibrateStatistics

EPS = 1e-3


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(inputs)
    h = keras_bn.BatchNormalization(epsilon=EPS, name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dense(4, name="d2")(h)
    h = keras.layers.BatchNormalization(epsilon=EPS, name="bn2")(h)  # Keras's
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def _data(n=96):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(n, 6)) * 2 + 1).astype("float32")
    return x, rng.normal(size=(n, 1)).astype("float32")


def _w(model, name):
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float64)
            for v in model.get_layer(name).weights]


def _exact_statistics(model, x):
    """Each BN layer's input mean and biased variance under the current
    weights, in float64, the layers before it normalizing with their own
    exact statistics (recalibrate's inference mode)."""
    x = x.astype(np.float64)
    kernel, bias = _w(model, "d1")
    h1 = x @ kernel + bias
    m1, v1 = h1.mean(0), h1.var(0)
    gamma, beta = _w(model, "bn1")[:2]
    a = np.maximum(gamma * (h1 - m1) / np.sqrt(v1 + EPS) + beta, 0)
    kernel, bias = _w(model, "d2")
    h2 = a @ kernel + bias
    return {"bn1": (m1, v1), "bn2": (h2.mean(0), h2.var(0))}


def _moving(model, name):
    layer = model.get_layer(name)
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float64)
            for v in (layer.moving_mean, layer.moving_variance)]


def _assert_match(model, x, what):
    for name, (mean, var) in _exact_statistics(model, x).items():
        got_mean, got_var = _moving(model, name)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{what}: {name} moving mean")
        np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{what}: {name} moving variance")


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_statistics_match_the_ema_weights_after_fit(run_eagerly):
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True,
                                                  ema_momentum=0.5),
                  loss="mse", run_eagerly=run_eagerly)
    x, y = _data()
    callback = RecalibrateStatistics(x, batch_size=32)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert callback.calls == 1
    _assert_match(model, x, "after fit")


def test_every_epoch_matches_each_epochs_weights():
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x, y = _data()
    seen = []

    class Check(keras.callbacks.Callback):  # runs after RecalibrateStatistics
        def on_epoch_end(self, epoch, logs=None):
            _assert_match(self.model, x, f"epoch {epoch}")
            seen.append(epoch)

    recal = RecalibrateStatistics(x, every_epoch=True)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[recal, Check()])
    assert seen == [0, 1] and recal.calls == 3  # 2 epochs + the end


def test_bad_arguments_fail_at_construction():
    x, _ = _data(8)
    with pytest.raises(TypeError, match="every_epoch"):
        RecalibrateStatistics(x, every_epoch="yes")
    with pytest.raises(TypeError, match="unknown.*'epochs'"):
        RecalibrateStatistics(x, epochs=2)
    with pytest.raises(ValueError, match="mode"):
        RecalibrateStatistics(x, mode="eval")
    with pytest.raises(ValueError, match="batch_size"):
        RecalibrateStatistics(x, batch_size=0)

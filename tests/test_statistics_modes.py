"""`statistics=`, `update_moving_statistics=` and `set_statistics` (issue 16,
section 1): which statistics normalize, and when the moving ones update,
apart from `training`; in eager and compiled `fit` / `predict`."""

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference as ref

BACKEND = keras.backend.backend()
FEATURES = 4
EPS = 1e-3
MOMENTUM = 0.8


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)) * [1.0, 2.0, 0.5, 3.0] + [5, -1, 0, 2]
    y = rng.normal(size=(n, FEATURES))
    return x.astype("float32"), y.astype("float32")


def _model(**bn_kwargs):
    """Input -> BN (the layer under test sees the data itself)."""
    inputs = keras.Input((FEATURES,))
    bn = keras_bn.BatchNormalization(momentum=MOMENTUM, epsilon=EPS,
                                     name="bn", **bn_kwargs)
    model = keras.Model(inputs, bn(inputs))
    rng = np.random.default_rng(7)
    bn.moving_mean.assign(rng.normal(size=FEATURES).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2, FEATURES).astype("float32"))
    return model, bn


def _np(t):
    return keras.ops.convert_to_numpy(t).astype(np.float64)


def _moving(bn):
    return _np(bn.moving_mean), _np(bn.moving_variance)


@pytest.fixture(params=["eager", "compiled"])
def run_eagerly(request):
    return request.param == "eager"


def test_moving_freezes_statistics_while_gamma_and_beta_train(run_eagerly):
    model, bn = _model(statistics="moving")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  run_eagerly=run_eagerly)
    x, y = _data()
    before = [keras.ops.convert_to_numpy(v).copy()
              for v in (bn.moving_mean, bn.moving_variance)]
    gamma0, beta0 = _np(bn.gamma), _np(bn.beta)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    for b, v in zip(before, (bn.moving_mean, bn.moving_variance)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), b)
    assert np.abs(_np(bn.gamma) - gamma0).max() > 1e-3
    assert np.abs(_np(bn.beta) - beta0).max() > 1e-3
    # Training-mode outputs: normalized with the moving statistics.
    out = _np(model(x[:16], training=True))
    mean, var = _moving(bn)
    want = ref.forward_infer(x[:16], (1,), _np(bn.gamma), _np(bn.beta),
                             mean, var, EPS)
    ref.assert_close(out, want, what="training output, statistics='moving'")


def test_batch_predict_normalizes_each_batch_with_its_own(run_eagerly):
    model, bn = _model(statistics="batch")
    model.compile(loss="mse", run_eagerly=run_eagerly)
    x, _ = _data(48, seed=1)
    before = _moving(bn)
    out = model.predict(x, batch_size=16, verbose=0).astype(np.float64)
    for i in range(3):
        part = slice(16 * i, 16 * (i + 1))
        want, _, _ = ref.forward_train(x[part], (1,), _np(bn.gamma),
                                       _np(bn.beta), EPS)
        ref.assert_close(out[part], want, what=f"predict batch {i}")
    # update_moving_statistics=None: inference leaves them alone.
    for b, a in zip(before, _moving(bn)):
        np.testing.assert_array_equal(a, b)


def test_batch_predict_with_updates_follows_the_ema(run_eagerly):
    model, bn = _model(statistics="batch", update_moving_statistics=True)
    model.compile(loss="mse", run_eagerly=run_eagerly)
    x, _ = _data(48, seed=2)
    mean, var = _moving(bn)
    model.predict(x, batch_size=16, verbose=0)
    for i in range(3):
        _, mu, v = ref.batch_stats(x[16 * i:16 * (i + 1)], (1,))
        mean = ref.ema(mean, mu.reshape(-1), MOMENTUM)
        var = ref.ema(var, v.reshape(-1), MOMENTUM)
    got_mean, got_var = _moving(bn)
    ref.assert_close(got_mean, mean, what="moving mean after predict")
    ref.assert_close(got_var, var, what="moving variance after predict")


def test_update_false_never_updates_and_none_is_keras_rule():
    x, _ = _data(16, seed=3)
    model, bn = _model(update_moving_statistics=False)
    before = _moving(bn)
    y = _np(bn(x, training=True))
    for b, a in zip(before, _moving(bn)):
        np.testing.assert_array_equal(a, b)
    want, mu, var = ref.forward_train(x, (1,), _np(bn.gamma), _np(bn.beta),
                                      EPS)
    ref.assert_close(y, want, what="batch statistics, no update")
    # Defaults: Keras's rule, in training and in inference.
    model, bn = _model()
    start = _moving(bn)
    bn(x, training=True)
    ref.assert_close(_moving(bn)[0], ref.ema(start[0], mu.reshape(-1),
                                             MOMENTUM))
    after = _moving(bn)
    bn(x, training=False)
    for b, a in zip(after, _moving(bn)):
        np.testing.assert_array_equal(a, b)


def test_trainable_false_still_freezes_gamma_under_statistics_batch():
    model, bn = _model(statistics="batch")
    bn.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = _data(32, seed=4)
    gamma0 = _np(bn.gamma)
    before = _moving(bn)
    model.fit(x, y, batch_size=16, verbose=0)
    np.testing.assert_array_equal(_np(bn.gamma), gamma0)
    for b, a in zip(before, _moving(bn)):  # not training: no update
        np.testing.assert_array_equal(a, b)
    want, _, _ = ref.forward_train(x[:16], (1,), gamma0, _np(bn.beta), EPS)
    ref.assert_close(_np(bn(x[:16], training=False)), want,
                     what="statistics='batch' with trainable=False")


def test_set_statistics_counts_layers_and_takes_effect_on_recompile():
    inner_in = keras.Input((FEATURES,))
    inner = keras.Model(inner_in, keras_bn.BatchNormalization(name="a")(
        inner_in), name="inner")
    inputs = keras.Input((FEATURES,))
    model = keras.Model(inputs, keras_bn.BatchNormalization(name="b")(
        inner(inputs)))
    model.compile(loss="mse")
    x, _ = _data(16, seed=5)
    model.predict(x, verbose=0)  # traces predict with Keras's rule
    assert keras_bn.set_statistics(model, statistics="batch") == 2
    layers = [model.get_layer("inner").get_layer("a"), model.layers[-1]]
    assert [bn.statistics for bn in layers] == ["batch", "batch"]
    model.compile(loss="mse")  # documented: recompile, as with trainable
    out = model.predict(x, batch_size=16, verbose=0).astype(np.float64)
    h, _, _ = ref.forward_train(x, (1,), np.ones(FEATURES),
                                np.zeros(FEATURES), 1e-3)
    want, _, _ = ref.forward_train(h, (1,), np.ones(FEATURES),
                                   np.zeros(FEATURES), 1e-3)
    ref.assert_close(out, want, what="predict after set_statistics")
    assert keras_bn.set_statistics(model) == 2
    assert [bn.statistics for bn in layers] == [None, None]


def test_set_statistics_refuses_keras_layers_and_bad_values():
    inputs = keras.Input((FEATURES,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(
        name="theirs")(inputs))
    with pytest.raises(TypeError, match="'theirs'.*convert"):
        keras_bn.set_statistics(model, statistics="moving")
    ours, _ = _model()
    with pytest.raises(ValueError, match="statistics.*'frozen'"):
        keras_bn.set_statistics(ours, statistics="frozen")
    with pytest.raises(TypeError, match="update_moving_statistics.*1"):
        keras_bn.set_statistics(ours, update_moving_statistics=1)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"statistics": "frozen"}, ValueError, ["statistics", "'frozen'"]),
    ({"update_moving_statistics": 0}, TypeError,
     ["update_moving_statistics", "0"]),
])
def test_constructor_rejects(kwargs, error, words):
    with pytest.raises(error) as info:
        keras_bn.BatchNormalization(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_config_round_trip_and_convert_refusals():
    layer = keras_bn.BatchNormalization(statistics="moving",
                                        update_moving_statistics=False)
    config = layer.get_config()
    assert config["statistics"] == "moving"
    assert config["update_moving_statistics"] is False
    again = keras_bn.BatchNormalization.from_config(config)
    assert (again.statistics, again.update_moving_statistics) == (
        "moving", False)
    model, _ = _model(statistics="batch")
    with pytest.raises(ValueError, match="'bn'.*statistics='batch'"):
        keras_bn.convert(model, to=keras.layers.BatchNormalization)
    with pytest.raises(ValueError, match="'bn'.*statistics='batch'"):
        keras_bn.fold(model)


@pytest.mark.parametrize("target", ["to_torch", "to_flax"])
def test_interop_refuses_the_switches(target):
    from keras_bn import interop

    layer = keras_bn.BatchNormalization(statistics="moving")
    layer.build((None, FEATURES))
    with pytest.raises(ValueError, match="statistics='moving'"):
        getattr(interop, target)(layer)

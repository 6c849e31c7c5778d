"""`debias_moving_statistics=True` (issue 16, section 4): inference with the
bias-corrected moving averages `(m_t - momentum**t m_0) / (1 - momentum**t)`
after 1, 5 and 50 updates, against a float64 NumPy reference of that rule
(written with `m_0`, from the raw average, independently of the layer's
recurrence), in eager and compiled `fit` / `predict`."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.convert import keras_layer_config
from tests import reference as ref

FEATURES = 3
MOMENTUM = 0.99
EPS = 1e-3
BATCH = 16


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count * BATCH, FEATURES)) * [1.0, 2.0, 0.5] + [
        5.0, -1.0, 0.0]
    return x.astype("float32")


def _debiased(x, updates, m0, v0, momentum=MOMENTUM):
    """The rule as the issue states it, from the raw moving averages."""
    mean, var = np.asarray(m0, np.float64), np.asarray(v0, np.float64)
    for t in range(updates):
        _, mu, v = ref.batch_stats(x[t * BATCH:(t + 1) * BATCH], (1,))
        mean = ref.ema(mean, mu.reshape(-1), momentum)
        var = ref.ema(var, v.reshape(-1), momentum)
    bias = momentum ** updates
    return ((mean - bias * np.asarray(m0)) / (1 - bias),
            (var - bias * np.asarray(v0)) / (1 - bias))


def _np(t):
    return keras.ops.convert_to_numpy(t).astype(np.float64)


@pytest.mark.parametrize("run_eagerly", [True, False],
                         ids=["eager", "compiled"])
@pytest.mark.parametrize("updates", [1, 5, 50])
def test_inference_after_updates_matches_the_debiased_rule(updates,
                                                           run_eagerly):
    inputs = keras.Input((FEATURES,))
    bn = keras_bn.BatchNormalization(
        momentum=MOMENTUM, epsilon=EPS, debias_moving_statistics=True,
        moving_mean_initializer="ones", moving_variance_initializer="ones")
    model = keras.Model(inputs, bn(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                  run_eagerly=run_eagerly)
    x = _batches(updates)
    model.fit(x, x, batch_size=BATCH, shuffle=False, verbose=0)
    mean, var = _debiased(x, updates, np.ones(FEATURES), np.ones(FEATURES))
    probe = _batches(2, seed=9)
    want = ref.forward_infer(probe, (1,), _np(bn.gamma), _np(bn.beta), mean,
                             var, EPS)
    out = model.predict(probe, batch_size=BATCH, verbose=0)
    ref.assert_close(out, want, what=f"inference after {updates} updates")
    ref.assert_close(_np(bn.debias_weight),
                     np.full(FEATURES, MOMENTUM ** updates),
                     what="debias_weight")


def test_after_one_update_the_statistics_are_the_batch_statistics():
    bn = keras_bn.BatchNormalization(debias_moving_statistics=True,
                                     momentum=0.999)
    x = _batches(1, seed=1)
    bn(x, training=True)
    _, mu, v = ref.batch_stats(x, (1,))
    ref.assert_close(_np(bn.moving_mean), mu.reshape(-1))
    ref.assert_close(_np(bn.moving_variance), v.reshape(-1))


def test_a_skipped_channel_does_not_count_an_update():
    bn = keras_bn.BatchNormalization(debias_moving_statistics=True,
                                     momentum=MOMENTUM)
    x = _batches(2, seed=2)
    first = x[:BATCH].copy()
    first[0, 2] = np.inf  # channel 2 skips the first update
    bn(first, training=True)
    bn(x[BATCH:], training=True)
    ref.assert_close(_np(bn.debias_weight),
                     [MOMENTUM ** 2, MOMENTUM ** 2, MOMENTUM])
    # Channel 2 has had one update: the second batch's statistics.
    _, mu, v = ref.batch_stats(x[BATCH:], (1,))
    ref.assert_close(_np(bn.moving_mean)[2], mu.reshape(-1)[2])
    ref.assert_close(_np(bn.moving_variance)[2], v.reshape(-1)[2])


def test_with_accumulation_one_update_per_round():
    bn = keras_bn.BatchNormalization(debias_moving_statistics=True,
                                     momentum=MOMENTUM,
                                     moving_statistics_steps=2)
    x = _batches(2, seed=3)
    bn(x[:BATCH], training=True)
    np.testing.assert_array_equal(_np(bn.debias_weight), np.ones(FEATURES))
    bn(x[BATCH:], training=True)
    # One update from the 32 pooled samples: exactly their statistics.
    _, mu, v = ref.batch_stats(x, (1,))
    ref.assert_close(_np(bn.moving_mean), mu.reshape(-1))
    ref.assert_close(_np(bn.moving_variance), v.reshape(-1))


def test_recalibrate_leaves_no_bias_to_correct():
    inputs = keras.Input((FEATURES,))
    bn = keras_bn.BatchNormalization(debias_moving_statistics=True,
                                     momentum=MOMENTUM)
    model = keras.Model(inputs, bn(inputs))
    x = _batches(4, seed=4)
    bn(x[:BATCH], training=True)
    keras_bn.recalibrate(model, x, batch_size=BATCH)
    np.testing.assert_array_equal(_np(bn.debias_weight), np.zeros(FEATURES))
    # The next update is a plain EMA step from the measured statistics.
    _, mu_all, _ = ref.batch_stats(x, (1,))
    new = _batches(1, seed=5)
    bn(new, training=True)
    _, mu, _ = ref.batch_stats(new, (1,))
    ref.assert_close(_np(bn.moving_mean),
                     ref.ema(mu_all.reshape(-1), mu.reshape(-1), MOMENTUM))


def test_convert_override_starts_fresh_statistics_unweighted():
    inputs = keras.Input((FEATURES,))
    keras_bn_layer = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, keras_bn_layer(inputs))
    keras_bn_layer.moving_mean.assign([0.5, 0.0, 0.0])  # channel 0 trained
    ours = keras_bn.convert(model, debias_moving_statistics=True)
    np.testing.assert_array_equal(_np(ours.get_layer("bn").debias_weight),
                                  [0.0, 1.0, 1.0])


def test_weight_exists_only_when_on_and_config_round_trips():
    bn = keras_bn.BatchNormalization(debias_moving_statistics=True)
    bn.build((None, FEATURES))
    assert [w.name for w in bn.non_trainable_weights] == [
        "moving_mean", "moving_variance", "debias_weight"]
    again = keras_bn.BatchNormalization.from_config(bn.get_config())
    assert again.debias_moving_statistics is True
    # An inference-only Keras copy predicts the same (the stored statistics
    # are inference's); a training copy would not.
    config = keras_layer_config(bn.get_config(), "bn", training=False)
    assert "debias_moving_statistics" not in config
    with pytest.raises(ValueError, match="debias_moving_statistics=True"):
        keras_layer_config(bn.get_config(), "bn", training=True)


def test_bad_values_and_refused_combinations():
    with pytest.raises(TypeError, match="debias_moving_statistics.*1"):
        keras_bn.BatchNormalization(debias_moving_statistics=1)
    with pytest.raises(ValueError, match="debias_moving_statistics.*renorm"):
        keras_bn.BatchNormalization(debias_moving_statistics=True,
                                    renorm=True)
    with pytest.raises(ValueError, match="momentum=None"):
        keras_bn.BatchNormalization(debias_moving_statistics=True,
                                    momentum=None)

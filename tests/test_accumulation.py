"""`moving_statistics_steps=k` (issue 16, section 2): the statistics of k
consecutive training batches pooled exactly, one moving-average update per
k batches, as gradient accumulation updates the weights; checked against a
float64 NumPy reference in eager and compiled `fit`, and across a
checkpoint saved mid-round."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.convert import keras_layer_config
from tests import reference as ref

FEATURES = 3
MOMENTUM = 0.9
K = 4
BATCH = 16


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)) * [1.0, 2.0, 0.5] + [5.0, -1.0, 0.0]
    y = rng.normal(size=(n, 2))
    return x.astype("float32"), y.astype("float32")


def _model(**bn_kwargs):
    """Input -> BN -> Dense: the layer under test sees the data itself."""
    inputs = keras.Input((FEATURES,))
    bn = keras_bn.BatchNormalization(momentum=MOMENTUM, name="bn",
                                     moving_statistics_steps=K, **bn_kwargs)
    outputs = keras.layers.Dense(2, kernel_initializer="ones")(bn(inputs))
    return keras.Model(inputs, outputs), bn


def _np(t):
    return keras.ops.convert_to_numpy(t).astype(np.float64)


def _reference(x, batches, unbiased=False, mean=None, var=None):
    """One EMA update per K batches, from the pooled statistics of the
    K * BATCH samples (float64)."""
    mean = np.zeros(FEATURES) if mean is None else mean
    var = np.ones(FEATURES) if var is None else var
    for r in range(batches // K):
        pooled = np.asarray(x[r * K * BATCH:(r + 1) * K * BATCH], np.float64)
        n, mu, v = ref.batch_stats(pooled, (1,))
        v = v.reshape(-1) * (n.reshape(-1) / (n.reshape(-1) - 1) if unbiased
                             else 1.0)
        mean = ref.ema(mean, mu.reshape(-1), MOMENTUM)
        var = ref.ema(var, v, MOMENTUM)
    return mean, var


@pytest.mark.parametrize("run_eagerly", [True, False],
                         ids=["eager", "compiled"])
def test_one_update_per_round_from_pooled_statistics(run_eagerly):
    model, bn = _model()
    model.compile(optimizer=keras.optimizers.SGD(
        0.01, gradient_accumulation_steps=K), loss="mse",
        run_eagerly=run_eagerly)
    # Two whole rounds and half a third: the half round must not update.
    x, y = _data(BATCH * (2 * K + 2))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    mean, var = _reference(x, 2 * K)
    ref.assert_close(_np(bn.moving_mean), mean, what="moving mean")
    ref.assert_close(_np(bn.moving_variance), var, what="moving variance")
    # The half round is held in the accumulators: its 32 samples, exactly.
    n, mu, v = ref.batch_stats(np.asarray(x[-2 * BATCH:], np.float64), (1,))
    assert int(_np(bn.accumulated_batches)) == 2
    ref.assert_close(_np(bn.accumulated_count), n.reshape(-1))
    ref.assert_close(_np(bn.accumulated_mean), mu.reshape(-1),
                     what="accumulated mean")
    ref.assert_close(_np(bn.accumulated_m2), (v * n).reshape(-1),
                     what="accumulated m2")


def test_each_batch_is_normalized_with_its_own_statistics():
    model, bn = _model()
    x, _ = _data(BATCH, seed=1)
    out = _np(bn(x, training=True))
    want, _, _ = ref.forward_train(x, (1,), _np(bn.gamma), _np(bn.beta),
                                   bn.epsilon)
    ref.assert_close(out, want, what="training output, mid-round")
    np.testing.assert_array_equal(_np(bn.moving_mean), np.zeros(FEATURES))


def test_checkpoint_saved_mid_round_resumes_identically(tmp_path):
    x, y = _data(BATCH * 2 * K, seed=2)

    def compiled(model):
        model.compile(optimizer=keras.optimizers.Adam(
            1e-2, gradient_accumulation_steps=K), loss="mse")
        return model

    keras.utils.set_random_seed(0)
    straight, bn = _model()
    compiled(straight).fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    keras.utils.set_random_seed(0)
    first, _ = _model()
    compiled(first)
    half = BATCH * (K + 2)  # one round and half of the next
    first.fit(x[:half], y[:half], batch_size=BATCH, shuffle=False, verbose=0)
    path = str(tmp_path / "mid_round.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert int(_np(resumed.get_layer("bn").accumulated_batches)) == 2
    resumed.fit(x[half:], y[half:], batch_size=BATCH, shuffle=False,
                verbose=0)
    # Same layers in the same order (their automatic names differ).
    for a, b in zip(straight.weights, resumed.weights):
        assert a.name == b.name
        np.testing.assert_allclose(_np(b), _np(a), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    mean, var = _reference(x, 2 * K)
    ref.assert_close(_np(resumed.get_layer("bn").moving_mean), mean)
    ref.assert_close(_np(resumed.get_layer("bn").moving_variance), var)


def test_pytorch_rules_count_rounds_and_pool_the_unbiased_variance():
    bn = keras_bn.BatchNormalization(
        momentum=None, moving_variance_estimator="unbiased",
        moving_statistics_steps=K)
    x, _ = _data(BATCH * 2 * K, seed=3)
    for i in range(2 * K):
        bn(x[i * BATCH:(i + 1) * BATCH], training=True)
    assert int(_np(bn.num_batches_tracked)) == 2
    rounds = [np.asarray(x[r * K * BATCH:(r + 1) * K * BATCH], np.float64)
              for r in range(2)]
    # Cumulative average of the two rounds' pooled statistics.
    want_mean = np.mean([r.mean(0) for r in rounds], 0)
    want_var = np.mean([r.var(0, ddof=1) for r in rounds], 0)
    ref.assert_close(_np(bn.moving_mean), want_mean)
    ref.assert_close(_np(bn.moving_variance), want_var)


def test_nonfinite_batch_leaves_its_round():
    bn = keras_bn.BatchNormalization(momentum=MOMENTUM,
                                     moving_statistics_steps=K)
    x, _ = _data(BATCH * K, seed=4)
    bad = x.copy()
    bad[BATCH + 3, 1] = np.nan  # batch 2, channel 1
    for i in range(K):
        bn(bad[i * BATCH:(i + 1) * BATCH], training=True)
    pooled = np.asarray(x, np.float64)
    keep = np.r_[0:BATCH, 2 * BATCH:K * BATCH]  # without batch 2
    want_mean = ref.ema(np.zeros(FEATURES), pooled.mean(0), MOMENTUM)
    want_mean[1] = ref.ema(0.0, pooled[keep, 1].mean(), MOMENTUM)
    want_var = ref.ema(np.ones(FEATURES), pooled.var(0), MOMENTUM)
    want_var[1] = ref.ema(1.0, pooled[keep, 1].var(), MOMENTUM)
    ref.assert_close(_np(bn.moving_mean), want_mean)
    ref.assert_close(_np(bn.moving_variance), want_var)


def test_weights_exist_only_when_on_and_config_round_trips():
    plain = keras_bn.BatchNormalization()
    plain.build((None, FEATURES))
    assert [w.name for w in plain.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    bn = keras_bn.BatchNormalization(moving_statistics_steps=K)
    bn.build((None, FEATURES))
    assert [w.name for w in bn.non_trainable_weights] == [
        "moving_mean", "moving_variance", "accumulated_count",
        "accumulated_mean", "accumulated_m2", "accumulated_batches"]
    config = bn.get_config()
    assert config["moving_statistics_steps"] == K
    again = keras_bn.BatchNormalization.from_config(config)
    assert again.moving_statistics_steps == K


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
    ("4", TypeError)])
def test_bad_values_name_the_argument(value, error):
    with pytest.raises(error, match=f"moving_statistics_steps.*{value!r}"):
        keras_bn.BatchNormalization(moving_statistics_steps=value)


def test_refused_with_renorm_and_by_keras_and_torch_targets():
    with pytest.raises(ValueError, match="moving_statistics_steps=4.*renorm"):
        keras_bn.BatchNormalization(renorm=True, moving_statistics_steps=4)
    model, _ = _model()
    with pytest.raises(ValueError, match="moving_statistics_steps=4"):
        keras_bn.convert(model, to=keras.layers.BatchNormalization)
    # An inference-only copy (fold's fallback) drops it.
    copy = keras_layer_config(model.get_layer("bn").get_config(), "bn",
                              training=False)
    assert "moving_statistics_steps" not in copy
    if keras.backend.backend() == "torch":
        from keras_bn import interop
        with pytest.raises(ValueError, match="moving_statistics_steps=4"):
            interop.to_torch(model.get_layer("bn"))

"""Ghost batch normalization (virtual_batch_size) against the NumPy reference."""

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference as ref
from tests.autodiff import call_with_grads

EPS = 1e-3


def _groups(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@pytest.mark.parametrize(
    "shape, axis, feat, vbs",
    [((12, 3), -1, (1,), 4), ((10, 3), -1, (1,), 4), ((7, 4, 2), -1, (2,), 3),
     ((9, 2, 3, 3), 1, (1,), 4), ((6, 3, 2, 4), [1, 3], (1, 3), 2),
     ((5, 3), -1, (1,), 8)],
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("renorm", [False, True], ids=["bn", "renorm"])
def test_matches_reference(shape, axis, feat, vbs, masked, renorm):
    rng = np.random.default_rng(len(shape) + vbs)
    momentum = 0.7
    clip = {"rmax": 1.3, "dmax": 0.4} if renorm else None
    layer = keras_bn.BatchNormalization(axis=axis, momentum=momentum, epsilon=EPS,
                                        virtual_batch_size=vbs, renorm=renorm,
                                        renorm_clipping=clip)
    layer.build(shape)
    pshape = tuple(shape[a] for a in feat)
    gamma = rng.uniform(0.5, 1.5, pshape)
    beta = rng.normal(size=pshape)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    x = (rng.normal(size=shape) * 2 + 3).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    mask = w = None
    if masked:
        mask, w = ref.channel_constant_mask(shape, feat, rng, keep=0.7)
        # Every group keeps a value: its first sample, everywhere.
        first = (np.arange(shape[0]) % vbs == 0).reshape(
            (-1,) + (1,) * (mask.ndim - 1))
        mask = mask | first
        w = np.maximum(w, first.reshape((-1,) + (1,) * (len(shape) - 1)))

    y, dx, grads = call_with_grads(layer, x, dy, training=True, mask=mask)

    y_ref, dx_ref = np.zeros(shape), np.zeros(shape)
    dg_ref, db_ref = np.zeros(pshape), np.zeros(pshape)
    counts, means, variances = [], [], []
    for g in _groups(shape[0], vbs):
        wg = None if w is None else w[g]
        m, mu, var = ref.batch_stats(x[g], feat, wg)
        r = d = None
        if renorm:  # moving values are still the initial ones: 0 and 1
            r, d = ref.renorm_correction(mu.reshape(pshape), var.reshape(pshape),
                                         0.0, 1.0, EPS, clip)
        y_ref[g] = ref.forward_train(x[g], feat, gamma, beta, EPS, wg, r, d)[0]
        dxg, dgg, dbg = ref.backward_train(x[g], dy[g], feat, gamma, EPS, wg, r, d)
        dx_ref[g] = dxg
        dg_ref += dgg.reshape(pshape)
        db_ref += dbg.reshape(pshape)
        counts.append(m.reshape(pshape))
        means.append(mu.reshape(pshape))
        variances.append(var.reshape(pshape))
    counts = np.array(counts)
    # Moving statistics follow the count-weighted average of the groups'.
    mean = (counts * means).sum(0) / counts.sum(0)
    variance = (counts * variances).sum(0) / counts.sum(0)

    ref.assert_close(y, y_ref, what="outputs")
    ref.assert_close(dx, dx_ref, what="d inputs")
    ref.assert_close(grads["gamma"], dg_ref, what="d gamma")
    ref.assert_close(grads["beta"], db_ref, what="d beta")
    ref.assert_close(keras.ops.convert_to_numpy(layer.moving_mean),
                     ref.ema(0.0, mean, momentum), what="moving_mean")
    if renorm:
        stddev = ref.ema(1.0, np.sqrt(variance + EPS), momentum)
        expected_var = np.maximum(stddev**2 - EPS, 0.0)
    else:
        expected_var = ref.ema(1.0, variance, momentum)
    ref.assert_close(keras.ops.convert_to_numpy(layer.moving_variance),
                     expected_var, what="moving_variance")


@pytest.mark.parametrize("batch", [1, 3, 7, 16])
def test_inference_ignores_virtual_batch_size(batch):
    """Any batch size works in inference, and gives plain inference BN
    (tf.keras 2 failed on this: keras-team/keras#15790)."""
    rng = np.random.default_rng(batch)
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    plain = keras_bn.BatchNormalization()
    x = rng.normal(size=(batch, 5)).astype("float32")
    for lyr in (layer, plain):
        lyr.build(x.shape)
        lyr.moving_mean.assign(np.full(5, 0.5, "float32"))
        lyr.moving_variance.assign(np.full(5, 2.0, "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)),
                                  keras.ops.convert_to_numpy(plain(x)))


def test_fit_with_partial_last_batch_and_predict():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6)).astype("float32") * 3 + 1
    y = rng.integers(0, 2, size=(20,))
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8),
        keras_bn.BatchNormalization(virtual_batch_size=3),
        keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # 8, 8, 4
    assert np.all(np.isfinite(history.history["loss"]))
    p = model.predict(x, batch_size=7, verbose=0)
    assert p.shape == (20, 2) and np.all(np.isfinite(p))


def _compiled_training_call(layer):
    """The layer's training call as each backend compiles it: a tf.function
    with a symbolic batch size, a jax.jit of stateless_call, eager torch."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda t: layer(t, training=True),
                           input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    if backend == "jax":
        import jax

        state = ([v.value for v in layer.trainable_variables],
                 [v.value for v in layer.non_trainable_variables])
        step = jax.jit(lambda t: layer.stateless_call(*state, t, training=True)[0])
        return step
    return lambda t: layer(t, training=True)


@pytest.mark.parametrize("batch", [10, 4, 1])
def test_compiled_call_with_any_batch_size(batch):
    layer = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.0)
    layer.build((None, 3))
    fn = _compiled_training_call(layer)
    x = np.random.default_rng(batch).normal(size=(batch, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(fn(x))
    expected = np.concatenate([
        ref.forward_train(x[g], (1,), np.ones(3), np.zeros(3), EPS)[0]
        for g in _groups(batch, 4)])
    ref.assert_close(out, expected)

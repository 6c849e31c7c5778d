"""Keras's mask convention, read as Keras's layer reads it.

A mask of rank `rank - 1` is the input's shape without its last axis,
expanded at the last axis and broadcast, whatever `axis` is. Each case runs
against the float64 reference (with the exact counts that are ours) and
side by side with `keras.layers.BatchNormalization`.
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from tests import reference as ref

EPS = 1e-3
MOMENTUM = 0.5

# (input shape, axis, mask shape). The first is the issue's Masking example;
# in the last two both the Keras reading and "the input without the feature
# axis" fit the mask's shape, and Keras's must win.
CASES = [
    ((5, 2, 3), 1, (5, 2)),
    ((5, 3, 3, 2), 1, (5, 3, 3)),
    ((1, 2, 3, 4), -1, (1, 2, 1)),
    ((1, 2, 3, 4), 1, (1, 2, 1)),
    ((5, 3, 3), 1, (5, 3)),
    ((6, 4, 4), 2, (6, 4)),
]


def _case(shape, axis, mask_shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 10.0, shape).astype("float32")
    mask = rng.uniform(size=mask_shape) < 0.6
    mask.flat[0] = True
    dy = rng.normal(size=shape).astype("float32")
    return x, mask, dy


def _reference(x, mask, feat, gamma, beta, moving):
    """Training outputs and moving statistics; a channel that the mask
    empties normalizes with, and keeps, the moving statistics."""
    w = ref.keras_mask_weights(mask, x.shape)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    counts = w.sum(axis=red)
    full = counts > 0
    with np.errstate(invalid="ignore"):  # empty channels: 0/0, replaced
        _, mu, var = ref.batch_stats(x, feat, w)
    mu, var = mu.reshape(counts.shape), var.reshape(counts.shape)
    mu = np.where(full, mu, moving[0])
    var = np.where(full, var, moving[1])
    y = ref.forward_infer(x, feat, gamma, beta, mu, var, EPS)
    new_mean = np.where(full, ref.ema(moving[0], mu, MOMENTUM), moving[0])
    new_var = np.where(full, ref.ema(moving[1], var, MOMENTUM), moving[1])
    return y, w, full, new_mean, new_var


def _mixed_gradients(x, dy, w, feat, full, gamma, moving):
    """Gradients where some channels have no values: the masked training
    ones in the channels with values, the inference ones (the moving
    statistics, constants) in the others."""
    with np.errstate(invalid="ignore", divide="ignore"):  # empty: 0/0
        dx_t, dg_t, db_t = ref.backward_train(x, dy, feat, gamma, EPS, w)
    dx_i, dg_i, db_i = ref.backward_infer(x, dy, feat, gamma, moving[0],
                                          moving[1], EPS)
    pick = ref.param(full, x, feat) > 0
    return (np.where(pick, dx_t, dx_i), np.where(full, dg_t, dg_i),
            np.where(full, db_t, db_i))


def _assert_matches_reference(result, x, dy, mask, feat, gamma, beta,
                              moving):
    """A masked training call's outputs, moving statistics and gradients
    against the float64 reference; returns which channels kept values."""
    y_ref, w, full, mean_ref, var_ref = _reference(
        x, mask, feat, gamma, beta, moving)
    ref.assert_close(result.outputs, y_ref, what="outputs")
    ref.assert_close(result.moving["moving_mean"], mean_ref,
                     what="moving_mean")
    ref.assert_close(result.moving["moving_variance"], var_ref,
                     what="moving_variance")
    dx_ref, dg_ref, db_ref = _mixed_gradients(x, dy, w, feat, full, gamma,
                                              moving)
    ref.assert_close(result.dx, dx_ref, what="dx")
    ref.assert_close(result.grads["gamma"], dg_ref, what="dgamma")
    ref.assert_close(result.grads["beta"], db_ref, what="dbeta")
    return full


@pytest.mark.parametrize("shape,axis,mask_shape", CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_rank_minus_one_mask_is_read_as_keras_reads_it(shape, axis, mask_shape):
    x, mask, dy = _case(shape, axis, mask_shape, seed=len(shape) * 10 + axis % 7)
    feat = (axis % len(shape),)
    layer = keras_bn.BatchNormalization(axis=axis, momentum=MOMENTUM,
                                        epsilon=EPS)
    layer.build(shape)
    rng = np.random.default_rng(3)
    channels = shape[feat[0]]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    moving = (rng.normal(size=channels), rng.uniform(0.5, 2.0, channels))
    layer.set_weights([v.astype("float32") for v in (gamma, beta, *moving)])
    moving = tuple(keras.ops.convert_to_numpy(v).astype(np.float64)
                   for v in (layer.moving_mean, layer.moving_variance))

    result = _execution.run(layer, x, training=True, mask=mask, upstream=dy)

    _assert_matches_reference(result, x, dy, mask, feat, gamma, beta, moving)


def test_channel_without_values_normalizes_with_moving_statistics():
    """A mask that empties channel 1 of `axis=1`: that channel's outputs
    and gradients are inference's (the moving statistics, which it keeps),
    the others' those of their masked batch; nothing is NaN."""
    rng = np.random.default_rng(5)
    shape, feat = (5, 3, 4), (1,)
    x = rng.normal(5.0, 10.0, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=(5, 3)) < 0.6
    mask[0] = True
    mask[:, 1] = False
    layer = keras_bn.BatchNormalization(axis=1, momentum=MOMENTUM,
                                        epsilon=EPS)
    layer.build(shape)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    moving = (rng.normal(size=3), rng.uniform(0.5, 2.0, 3))
    layer.set_weights([v.astype("float32") for v in (gamma, beta, *moving)])
    gamma, beta, *moving = [w.astype(np.float64) for w in layer.get_weights()]

    result = _execution.run(layer, x, mask=mask, upstream=dy)

    full = _assert_matches_reference(result, x, dy, mask, feat, gamma, beta,
                                     moving)
    assert full.tolist() == [True, False, True]


@pytest.mark.parametrize("shape,axis,mask_shape", CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_same_results_as_keras_layer(shape, axis, mask_shape):
    x, mask, _ = _case(shape, axis, mask_shape, seed=7)
    ours = keras_bn.BatchNormalization(axis=axis, momentum=MOMENTUM)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM)
    y_ours = keras.ops.convert_to_numpy(ours(x, training=True, mask=mask))
    y_theirs = keras.ops.convert_to_numpy(theirs(x, training=True, mask=mask))
    feat = axis % len(shape)
    w = ref.keras_mask_weights(mask, shape)
    red = tuple(i for i in range(len(shape)) if i != feat)
    full = w.sum(axis=red) > 0
    # Keras's layer divides an empty channel by its epsilon (it outputs
    # beta and pulls the moving variance to 0); only full channels compare.
    take = lambda a: np.moveaxis(a, feat, 0)[full]  # noqa: E731
    np.testing.assert_allclose(take(y_ours), take(y_theirs), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a[full], b[full], rtol=1e-5, atol=1e-5)


def test_masking_layer_example_from_the_issue():
    """`Masking` feeding `axis=1`: Keras accepts it, and so do we."""
    x = np.random.default_rng(0).normal(5, 10, (5, 2, 3)).astype("float32")
    x[:, 1, :] = 0
    masked = keras.layers.Masking()(x)
    layer = keras_bn.BatchNormalization(axis=1, momentum=0.0)
    y = keras.ops.convert_to_numpy(layer(masked, training=True))
    # Masking drops time step 1, which is channel 1 here: channel 0 counts
    # its 15 values, channel 1 none and keeps its moving statistics.
    values = x[:, 0, :].astype(np.float64)
    mean = keras.ops.convert_to_numpy(layer.moving_mean)
    var = keras.ops.convert_to_numpy(layer.moving_variance)
    np.testing.assert_allclose(mean, [values.mean(), 0.0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, [values.var(), 1.0], rtol=1e-5)
    np.testing.assert_allclose(
        y[:, 0, :], (values - values.mean()) / np.sqrt(values.var() + EPS),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, 1, :], 0.0, atol=1e-6)


def test_nonzero_values_count_as_true():
    """Keras casts a mask to bool; a float mask of 0.5 keeps its value."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 3)).astype("float32")
    bool_mask = rng.uniform(size=(6, 4)) < 0.5
    bool_mask[0] = True
    soft = np.where(bool_mask, 0.5, 0.0).astype("float32")
    a = keras_bn.BatchNormalization(momentum=0.0)
    b = keras_bn.BatchNormalization(momentum=0.0)
    ya = keras.ops.convert_to_numpy(a(x, training=True, mask=soft))
    yb = keras.ops.convert_to_numpy(b(x, training=True, mask=bool_mask))
    np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-6)
    values = x[bool_mask].astype(np.float64)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a.moving_mean),
                               values.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis,mask_shape", [
    ((5, 3, 4), 1, (5, 4)),        # without the feature axis: Keras rejects
    ((4, 5, 3), -1, (4, 6)),       # does not broadcast
    ((4, 5, 3), -1, (5,)),         # wrong rank
    ((4, 3, 5, 6), [1, 2], (4, 5)),  # several axes: (4, 6) would fit
])
def test_masks_that_fit_no_reading_are_rejected(shape, axis, mask_shape):
    layer = keras_bn.BatchNormalization(axis=axis)
    x = np.ones(shape, "float32")
    layer.build(shape)
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError) as info:
        layer(x, training=True, mask=np.ones(mask_shape, bool))
    message = str(info.value)
    assert "`mask`" in message and str(mask_shape) in message
    assert "last axis" in message
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_full_rank_and_feature_axes_readings_are_kept():
    """Our extra readings, which Keras's layer rejects by rank."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, (6, 3, 4, 5)).astype("float32")
    kept = rng.uniform(size=(6, 4)) < 0.6
    kept[0] = True
    # Full rank, constant along channels-first axis 1 and the last axis.
    full = kept[:, None, :, None]
    layer = keras_bn.BatchNormalization(axis=1, momentum=0.0)
    layer(x, training=True, mask=full)
    w = np.broadcast_to(full, x.shape).astype(np.float64)
    _, mu, var = ref.batch_stats(x, (1,), w)
    ref.assert_close(layer.moving_mean, mu.ravel(), what="moving_mean")
    ref.assert_close(layer.moving_variance, var.ravel(), what="moving_variance")
    # Several feature axes: the input's shape without them.
    layer = keras_bn.BatchNormalization(axis=[1, 3], momentum=0.0)
    layer(x, training=True, mask=kept)
    w = np.broadcast_to(kept[:, None, :, None], x.shape).astype(np.float64)
    _, mu, _ = ref.batch_stats(x, (1, 3), w)
    ref.assert_close(layer.moving_mean, mu.reshape(3, 5), what="moving_mean")


def test_mask_in_compiled_fit_matches_keras_layer():
    """Embedding(mask_zero) -> BN(axis=-1) under compiled fit: same moving
    statistics as Keras's layer."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 6, (16, 7))
    tokens[:, 0] = 1
    target = rng.normal(size=(16, 7, 4)).astype("float32")

    def run(norm):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((7,), dtype="int32"),
            keras.layers.Embedding(6, 4, mask_zero=True),
            norm(momentum=0.5),
        ])
        model.compile("sgd", "mse", jit_compile=keras.backend.backend() != "torch")
        model.fit(tokens, target, batch_size=8, epochs=1, shuffle=False,
                  verbose=0)
        return model.get_weights()

    for a, b in zip(run(keras_bn.BatchNormalization),
                    run(keras.layers.BatchNormalization)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

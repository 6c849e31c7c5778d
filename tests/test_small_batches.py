"""Batches too small to measure (issue 14, section 3).

Statistics of fewer than two values in a channel never update its moving
statistics (with `skip_nonfinite_updates=True`, the default); a training
call whose static shape leaves at most one value per channel warns once.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from tests import reference as ref

MOMENTUM = 0.8

FIT_MODES = {
    "eager": dict(run_eagerly=True),
    "jit-False": dict(jit_compile=False),
    "jit-True": dict(jit_compile=True),
}


def _np(t):
    # A copy: on torch the array would share the variable's memory, which
    # the next update overwrites in place.
    return np.array(_execution._numpy(keras.ops.convert_to_tensor(t)))


class _Moving(keras.callbacks.Callback):
    """The layer's moving statistics after every training batch."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()  # JAX's fit holds the state
        self.seen.append(tuple(_np(w) for w in (
            self.layer.moving_mean, self.layer.moving_variance)))


def _fit(compile_kwargs, seed, **bn_kwargs):
    """The moving statistics after each batch of a fit on 33 samples in
    batches of 32: the last batch has one sample."""
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, (33, 4)).astype("float32")
    y = rng.normal(size=(33, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    bn = keras_bn.BatchNormalization(**{"momentum": MOMENTUM, **bn_kwargs})
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), bn])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  **compile_kwargs)
    record = _Moving(bn)
    with warnings.catch_warnings():
        # A static batch of one (JAX traces each batch shape) warns.
        warnings.simplefilter("ignore", UserWarning)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                  callbacks=[record])
    assert len(record.seen) == 2
    return record.seen


@pytest.mark.parametrize("mode", list(FIT_MODES))
def test_fit_last_batch_of_one_sample_leaves_moving_statistics(mode):
    """The last batch (one sample) leaves the moving statistics exactly
    as the first batch left them."""
    (mean, var), (last_mean, last_var) = _fit(FIT_MODES[mode], seed=0)
    assert np.abs(var - 1.0).max() > 1e-3  # the first batch moved it
    np.testing.assert_array_equal(last_var, var)
    np.testing.assert_array_equal(last_mean, mean)


def test_fit_last_batch_of_one_sample_pytorch_rules():
    first, last = _fit(FIT_MODES["jit-False"], seed=1, momentum=None,
                       moving_variance_estimator="unbiased")
    for a, b in zip(first, last):
        np.testing.assert_array_equal(b, a)


def _trained_layer(**kwargs):
    """A layer whose moving statistics have moved off their start."""
    rng = np.random.default_rng(2)
    layer = keras_bn.BatchNormalization(momentum=MOMENTUM, **kwargs)
    layer.build((None, 3))
    layer.beta.assign(np.array([0.5, -1.0, 2.0], "float32"))
    with warnings.catch_warnings():  # a batch of 8 does not warn
        warnings.simplefilter("error", UserWarning)
        layer(rng.normal(1.0, 2.0, (8, 3)).astype("float32"), training=True)
    return layer


def _moving(layer):
    return _np(layer.moving_mean), _np(layer.moving_variance)


@pytest.mark.parametrize("mode", _execution.modes())
def test_one_sample_and_one_value_channels_keep_moving_statistics(mode):
    layer = _trained_layer()
    mean0, var0 = _moving(layer)
    x = np.array([[3.0, -4.0, 7.0]], "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = _execution.run(layer, x, mode=mode, grad=False)
    np.testing.assert_array_equal(result.moving["moving_mean"], mean0)
    np.testing.assert_array_equal(result.moving["moving_variance"], var0)
    # The output is as Keras's layer gives it: beta.
    np.testing.assert_allclose(result.outputs, [[0.5, -1.0, 2.0]], atol=1e-6)

    # A mask that keeps one value of channel 0, none of channel 1 and four
    # of channel 2: only channel 2 moves, by the float64 reference.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3)).astype("float32")
    mask = np.zeros((6, 3), bool)
    mask[2, 0] = True
    mask[1:5, 2] = True
    result = _execution.run(layer, x, mode=mode, mask=mask, grad=False)
    _, mu, var = ref.batch_stats(x[1:5, 2:], (1,))
    np.testing.assert_array_equal(result.moving["moving_mean"][:2],
                                  mean0[:2])
    np.testing.assert_array_equal(result.moving["moving_variance"][:2],
                                  var0[:2])
    ref.assert_close(result.moving["moving_mean"][2:],
                     ref.ema(mean0[2:], mu.ravel(), MOMENTUM), 1e-6)
    ref.assert_close(result.moving["moving_variance"][2:],
                     ref.ema(var0[2:], var.ravel(), MOMENTUM), 1e-6)
    # Channel 0's kept value is its batch mean: it outputs beta.
    np.testing.assert_allclose(result.outputs[2, 0], 0.5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="TensorFlow traces for an unknown batch size")
@pytest.mark.parametrize("mode", ["function", "xla"])
def test_dynamic_batch_size_skips_when_the_call_runs(mode):
    """model.fit's case on TensorFlow: traced for any batch size, so no
    warning, and a batch of one leaves the moving statistics."""
    layer = _trained_layer()
    mean0, var0 = _moving(layer)
    x = np.array([[3.0, -4.0, 7.0]], "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = _execution.run(layer, x, mode=mode, grad=False,
                                unknown_batch=True)
    np.testing.assert_array_equal(result.moving["moving_mean"], mean0)
    np.testing.assert_array_equal(result.moving["moving_variance"], var0)


def _warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning)
            and "value(s) per channel" in str(w.message)]


def test_static_batch_of_one_warns_once_per_layer():
    layer = keras_bn.BatchNormalization()
    one = np.ones((1, 3), "float32")
    assert not _warnings(lambda: layer(np.ones((2, 3), "float32"),
                                       training=True))
    assert not _warnings(lambda: layer(one, training=False))
    messages = _warnings(lambda: [layer(one, training=True),
                                  layer(one, training=True),
                                  layer(one.astype("float64"), training=True)])
    assert len(messages) == 1
    assert layer.name in messages[0] and "(1, 3)" in messages[0]
    assert "leaves the moving statistics unchanged" in messages[0]
    # Another layer warns on its own.
    assert len(_warnings(lambda: keras_bn.BatchNormalization()(
        one, training=True))) == 1


def test_ghost_batches_of_one_warn():
    layer = keras_bn.BatchNormalization(virtual_batch_size=1)
    messages = _warnings(lambda: layer(np.ones((4, 3), "float32"),
                                       training=True))
    assert len(messages) == 1 and "virtual_batch_size=1" in messages[0]
    layer = keras_bn.BatchNormalization(virtual_batch_size=2)
    assert not _warnings(lambda: layer(np.ones((4, 3), "float32"),
                                       training=True))


def test_skip_nonfinite_updates_false_is_keras_rule():
    """False: a batch of one updates as Keras's layer does (towards
    variance 0), and the warning says so."""
    x = np.array([[3.0, -4.0, 7.0]], "float32")
    ours = keras_bn.BatchNormalization(momentum=MOMENTUM,
                                       skip_nonfinite_updates=False)
    theirs = keras.layers.BatchNormalization(momentum=MOMENTUM)
    messages = _warnings(lambda: ours(x, training=True))
    assert len(messages) == 1 and "pulls the moving variance" in messages[0]
    y = theirs(x, training=True)
    np.testing.assert_allclose(_np(ours.moving_mean), _np(theirs.moving_mean),
                               rtol=1e-6)
    np.testing.assert_allclose(_np(ours.moving_variance),
                               _np(theirs.moving_variance), rtol=1e-6)
    np.testing.assert_allclose(_np(ours.moving_variance), MOMENTUM)
    np.testing.assert_allclose(_np(ours(x, training=True)), _np(y), atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(renorm=True),
    dict(momentum=None, moving_variance_estimator="unbiased"),
], ids=["renorm", "pytorch-rules"])
def test_options_skip_single_values_too(kwargs):
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build((None, 3))
    before = {w.name: _np(w) for w in layer.non_trainable_weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer(np.array([[3.0, -4.0, 7.0]], "float32"), training=True)
    for w in layer.non_trainable_weights:
        if w.name == "num_batches_tracked":  # counts calls, as PyTorch's
            assert int(_np(w)) == 1
        elif w.name == "moving_variance" and layer.renorm:
            # Renorm derives it from the (unchanged) moving stddev, as
            # Keras's layer does: stddev**2 - epsilon.
            np.testing.assert_allclose(
                _np(w), _np(layer.moving_stddev)**2 - layer.epsilon,
                rtol=1e-6)
        else:
            np.testing.assert_array_equal(_np(w), before[w.name], w.name)


def test_config_round_trip():
    layer = keras_bn.BatchNormalization(skip_nonfinite_updates=False)
    config = layer.get_config()
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert not clone.skip_nonfinite_updates

"""TensorFlow's exact path below the kernels' size floor, for known sizes
and for a batch size unknown when traced (what `model.fit` traces): small
inputs train in plain ops (`paths.tf_small`, `tensorflow_backend.
_small_train`, the paper's backward as a custom gradient), larger ones on
the kernels. Both against
the float64 reference and the eager reference path (`fused=False`)."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from keras_bn import paths
from tests import reference as ref
from tests.bn_models import randomize_bn
from tests.bn_models import weights64

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="TensorFlow traces for any batch")
EPS = 1e-3


def test_small_unknown_batch_rule():
    floor, rows = paths.TF_MIN_KERNEL_SIZE_CPU, paths.TF_UNKNOWN_BATCH_ROWS
    assert paths.small_unknown_batch((None, 128))
    assert paths.small_unknown_batch((None, floor // rows - 1))
    assert not paths.small_unknown_batch((None, floor // rows))
    assert not paths.small_unknown_batch((128, 128))  # a known batch
    assert not paths.small_unknown_batch((None, None, 8))
    assert not paths.small_unknown_batch((None, 16, 16, 8))
    # Known sizes: the floor itself.
    assert paths.tf_small((128, 128)) and paths.tf_small((None, 128))
    assert not paths.tf_small((floor // 64, 64))
    assert paths.tf_small((floor // 64 - 1, 64))
    # which_path says what runs.
    layer = keras_bn.BatchNormalization()
    small = layer.which_path(keras.ops.zeros((128, 128)), training=True)
    large = keras_bn.BatchNormalization().which_path(
        keras.ops.zeros((floor // 64, 64)), training=True)
    assert (small.name, small.reason) == (paths.EXACT_KERNEL,
                                          paths.TF_SMALL_WHY)
    assert large.reason == paths.WHY[paths.EXACT_KERNEL]


@pytest.mark.parametrize("shape", [(64, 6), (200, 130), (7, 5, 4),
                                   (6, 4, 5, 3), (300, 1), (2, 3)])
@pytest.mark.parametrize("offset", [0.5, 3e3, 1e5])
@pytest.mark.parametrize("mode", ["eager_reference", "float64"])
@pytest.mark.parametrize("unknown", [True, False], ids=["unknown", "static"])
def test_small_training_is_exact(shape, offset, mode, unknown):
    rng = np.random.default_rng(len(shape) + shape[0])
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build(shape)
    randomize_bn(layer, rng)
    w0 = weights64(layer)
    x = (offset + rng.normal(size=shape) * rng.uniform(0.5, 2.0, shape[-1])
         ).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    got = _execution.run(layer, x, mode="function", upstream=dy,
                         unknown_batch=unknown)
    traced = (None,) + shape[1:] if unknown else shape
    plan = next(p for facts, p in layer._plans.by_facts.items()
                if facts[1] == traced)
    assert plan.path.name == paths.EXACT_KERNEL
    assert paths.tf_small(traced)
    if mode == "eager_reference":
        slow = keras_bn.BatchNormalization(momentum=0.5, fused=False)
        slow.build(shape)
        slow.set_weights([w.astype("float32") for w in w0.values()])
        want = _execution.run(slow, x, upstream=dy)
        for a, b, what, tol in (
                (got.outputs, want.outputs, "outputs", 1e-5),
                (got.dx, want.dx, "d inputs", 1e-4),
                *((got.grads[k], want.grads[k], f"d {k}", 1e-4)
                  for k in want.grads),
                *((got.moving[k], want.moving[k], k, 1e-5)
                  for k in want.moving)):
            ref.assert_close(np.asarray(a, np.float64),
                             np.asarray(b, np.float64), tol=tol, what=what)
        return
    ref.assert_training_call(got, x, dy, (len(shape) - 1,), w0, EPS, 0.5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_unknown_batch_half_precision(dtype):
    rng = np.random.default_rng(3)
    shape = (32, 5)
    layer = keras_bn.BatchNormalization(momentum=0.5, dtype=f"mixed_{dtype}")
    layer.build(shape)
    w0 = weights64(randomize_bn(layer, rng))
    x = keras.ops.cast(rng.normal(size=shape) * 3.0 + 0.5, dtype)
    dy = keras.ops.cast(rng.normal(size=shape), dtype)
    seen = [keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")).astype(
        np.float64) for t in (x, dy)]
    got = _execution.run(layer, x, mode="function", upstream=dy,
                         unknown_batch=True)
    assert got.dtype == dtype
    tol = 2.0**-7 if dtype == "bfloat16" else 2.0**-9
    ref.assert_training_call(got, *seen, (1,), w0, EPS, 0.5, tol=tol)


def test_unknown_batch_nonfinite_and_tiny_batches_leave_moving_statistics():
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    before = [np.array(v) for v in (layer.moving_mean,
                                    layer.moving_variance)]
    for x in (np.array([[1.0, np.nan, 2.0], [3.0, 4.0, np.inf]], "float32"),
              np.zeros((1, 3), "float32"), np.zeros((0, 3), "float32")):
        result = _execution.run(layer, x, mode="function", grad=False,
                                unknown_batch=True)
        if len(x) == 2:  # channel 0 is finite: it updates
            np.testing.assert_array_equal(result.moving["moving_mean"][1:],
                                          before[0][1:])
            np.testing.assert_allclose(result.moving["moving_mean"][0], 1.0)
            before[0][0] = result.moving["moving_mean"][0]
            before[1][0] = result.moving["moving_variance"][0]
        else:
            np.testing.assert_array_equal(result.moving["moving_mean"],
                                          before[0])
            np.testing.assert_array_equal(result.moving["moving_variance"],
                                          before[1])
        assert np.all(np.isfinite(result.outputs[:, 0]))

"""The backends' fast paths against the keras.ops reference path.

Every fast path must give the reference path's (`fused=False`) outputs,
gradients and moving statistics. By default training runs the backends'
exact fast paths (float32 sums kept short; TensorFlow's covers channels-last
inputs on CPU outside XLA); the kernels as they are run only when asked for
(`fused=True`: their float32 sums are less exact on long reductions, see
test_default_training_is_exact_on_long_reductions); inference kernels run
by default. A spy on
`BatchNormalization._run_kernel` makes sure the fast path actually ran (or, for
the cases it must decline, that it did not), so that no comparison here is
the reference path against itself. Hand-computed values and the float64
NumPy reference (tests/reference.py) pin down the variance convention and
the large-mean behaviour independently of both paths.
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _execution
from keras_bn import paths
from tests import reference as ref
from tests.bn_models import randomize_bn
from tests.bn_models import weights64

BACKEND = keras.backend.backend()
EPS = 1e-3
# The mode of most tests here: one XLA program under JAX (op-by-op dispatch
# compiles every primitive separately, which is slow), else eager.
MODE = "jit" if BACKEND == "jax" else "eager"


@pytest.fixture
def spy(fused_calls, monkeypatch):
    """`fused_calls` (per kernel call, whether it ran).

    TensorFlow's CPU kernels leave small tensors to plain ops, and JAX's
    xla kernel small dense ones to the reference path (as fast there); the
    size floors are lifted so that the kernels run on the small tensors of
    these tests. TensorFlow's exact path pools groups of
    rows beyond `_KERNEL_GROUP_ROWS` rows (XLA's path beyond `_GROUP_ROWS`);
    both lowered to 100 here, so that the tests below over 100 rows take
    the grouped statistics, and the smaller ones the kernel's own.
    """
    monkeypatch.setattr(paths, "JAX_MIN_XLA_SIZE", 0)
    if BACKEND == "tensorflow":
        from keras_bn.backends import tensorflow_backend

        monkeypatch.setattr(paths, "TF_MIN_KERNEL_SIZE_CPU", 0)
        monkeypatch.setattr(tensorflow_backend, "_GROUP_ROWS", 100)
        monkeypatch.setattr(tensorflow_backend, "_KERNEL_GROUP_ROWS", 100)
    return fused_calls


def _pair(rng, shape, momentum=0.5, fused=True, **kwargs):
    """The same random weights in a fast-path layer and a reference one."""
    fast = keras_bn.BatchNormalization(momentum=momentum, fused=fused,
                                       **kwargs)
    slow = keras_bn.BatchNormalization(momentum=momentum, fused=False,
                                       **kwargs)
    fast.build(shape)
    slow.build(shape)
    randomize_bn(fast, rng)
    slow.set_weights(fast.get_weights())
    return fast, slow


def _assert_float64_training(result, x, dy, axis, gamma, beta, mean_tol):
    """A momentum-0 training call's outputs, gradients (VJPs with `dy`) and
    new moving statistics against the float64 reference."""
    expected, mu, var = ref.forward_train(x, (axis,), gamma, beta, EPS)
    ref.assert_close(result.outputs, expected, tol=1e-5, what="outputs")
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(x, dy, (axis,), gamma,
                                                       EPS)
    ref.assert_close(result.dx, dx_ref, tol=1e-5, what="d inputs")
    ref.assert_close(result.grads["gamma"], dgamma_ref, tol=1e-5,
                     what="d gamma")
    ref.assert_close(result.grads["beta"], dbeta_ref, tol=1e-5,
                     what="d beta")
    ref.assert_close(result.moving["moving_mean"], mu.ravel(), tol=mean_tol,
                     what="moving mean")
    ref.assert_close(result.moving["moving_variance"], var.ravel(), tol=1e-6,
                     what="moving variance")


def _run(layer, x, dy, mask=None, mode=MODE, **kwargs):
    """A training call with gradients (VJPs with `dy`), see _execution."""
    return _execution.run(layer, x, mode=mode, upstream=dy, mask=mask,
                          **kwargs)


def _numpy(t):
    return keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))


def _moving(layer):
    return [_numpy(layer.moving_mean), _numpy(layer.moving_variance)]


def _assert_same(a, b, tol, what):
    ref.assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64),
                     tol=tol, what=what)


def _check_float64(result, w0, x, dy, axis, momentum, tol):
    """A training call's `result` against the float64 reference, for a
    layer whose weights before the call were `w0`."""
    channels = x.shape[axis]
    gamma = w0.get("gamma", np.ones(channels))
    beta = w0.get("beta", np.zeros(channels))
    y_ref, mu, var = ref.forward_train(x, (axis,), gamma, beta, EPS)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(x, dy, (axis,), gamma,
                                                       EPS)
    ref.assert_close(result.outputs, y_ref, tol=tol, what="outputs (float64)")
    ref.assert_close(result.dx, dx_ref, tol=tol, what="d inputs (float64)")
    for name, expected in (("gamma", dgamma_ref), ("beta", dbeta_ref)):
        if name in result.grads:
            ref.assert_close(result.grads[name], expected, tol=tol,
                             what=f"d {name} (float64)")
    for name, batch in (("moving_mean", mu), ("moving_variance", var)):
        ref.assert_close(result.moving[name],
                         ref.ema(w0[name], batch.ravel(), momentum), tol=tol,
                         what=f"{name} (float64)")


# (input shape, axis): ranks 2 to 5, channels last and first.
LAYOUTS = [
    ((32, 6), -1),
    ((7, 5, 4), -1),
    ((6, 4, 5, 3), -1),
    ((6, 3, 4, 5), 1),
    ((3, 4, 3, 2, 5), -1),
    ((5, 6), 0),
    ((8, 16, 16, 4), -1),  # 2048 values a channel: PyTorch's grouped path
]


# The exact fast paths (the default) exist on every backend; TensorFlow's
# takes channels-last inputs on CPU only (else: the reference path).
BOTH_PATHS = pytest.mark.parametrize("fused", [None, True])


def _check_ran(spy, fused, channels_last=True, mode=MODE):
    if mode == "compile":
        # Under torch.compile the fast paths decline (their host-side
        # checks would break the graph): dynamo compiles the reference
        # path's ops, which the float64 checks hold to the same bounds.
        return
    ran = ("fused_train", True) in spy
    exact = True
    if BACKEND == "tensorflow":
        from keras_bn.backends import tensorflow_backend

        exact = channels_last and not tensorflow_backend._has_gpu()
    assert ran == (fused is True or exact), f"fast path ran: {ran}"


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
@BOTH_PATHS
def test_training_matches_reference_path(spy, shape, axis, center, scale,
                                         fused):
    rng = np.random.default_rng(1)
    fast, slow = _pair(rng, shape, fused=fused, axis=axis, center=center,
                       scale=scale)
    w0 = weights64(fast)
    x = (rng.normal(size=shape) * 3.0 + 2.0).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    got = _run(fast, x, dy)
    _check_ran(spy, fused, channels_last=axis in (-1, len(shape) - 1))
    want = _run(slow, x, dy)
    _assert_same(got.outputs, want.outputs, 1e-5, "outputs")
    _assert_same(got.dx, want.dx, 1e-5, "d inputs")
    assert got.grads.keys() == want.grads.keys()
    for name in got.grads:
        _assert_same(got.grads[name], want.grads[name], 1e-5, f"d {name}")
    for name in ("moving_mean", "moving_variance"):
        _assert_same(got.moving[name], want.moving[name], 1e-5, name)
    _check_float64(got, w0, x, dy, axis % len(shape), 0.5, 1e-5)
    # Inference with the updated statistics, fast and reference.
    spy.clear()
    out_fast = _numpy(fast(x, training=False))
    ran = ("fused_infer", True) in spy
    assert ran or BACKEND == "jax", "the inference fast path did not run"
    _assert_same(out_fast, _numpy(slow(x, training=False)), 1e-5,
                 "inference outputs")


@BOTH_PATHS
def test_moving_variance_is_the_biased_batch_variance(spy, fused):
    # x = 1, 2, 3, 4 in one channel: mean 2.5, biased variance
    # (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25 (unbiased would be 5/3).
    # With momentum 0.75: 0.75 * 0 + 0.25 * 2.5 = 0.625 and
    # 0.75 * 1 + 0.25 * 1.25 = 1.0625.
    layer = keras_bn.BatchNormalization(momentum=0.75, fused=fused)
    x = np.array([[1.0], [2.0], [3.0], [4.0]], "float32")
    y = _numpy(layer(x, training=True))
    _check_ran(spy, fused)
    np.testing.assert_allclose(_numpy(layer.moving_mean), [0.625], rtol=1e-6)
    np.testing.assert_allclose(_numpy(layer.moving_variance), [1.0625],
                               rtol=1e-6)
    # xhat = (x - 2.5) / sqrt(1.25 + 1e-3)
    expected = (x - 2.5) / np.sqrt(1.25 + 1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_single_value_per_channel_has_zero_variance():
    # One value per channel: the batch variance is 0 (not 0/0, not the
    # kernel's Bessel-corrected division by n - 1 = 0), the output is beta.
    # By default such statistics leave the moving ones (test_small_batches);
    # skip_nonfinite_updates=False updates from them, as Keras does.
    x = np.array([[3.0, -7.0]], "float32")
    layer = keras_bn.BatchNormalization(momentum=0.5, fused=True,
                                        beta_initializer="ones")
    y = _numpy(layer(x, training=True))
    np.testing.assert_allclose(y, [[1.0, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(_numpy(layer.moving_mean), [0.0, 0.0])
    np.testing.assert_array_equal(_numpy(layer.moving_variance), [1.0, 1.0])
    layer = keras_bn.BatchNormalization(momentum=0.5, fused=True,
                                        beta_initializer="ones",
                                        skip_nonfinite_updates=False)
    y = _numpy(layer(x, training=True))
    np.testing.assert_allclose(y, [[1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(_numpy(layer.moving_mean), [1.5, -3.5])
    np.testing.assert_allclose(_numpy(layer.moving_variance), [0.5, 0.5])


@pytest.mark.parametrize("shape", [(8, 3, 3, 4), (64, 3, 3, 4),
                                   (128, 32, 32, 8)], ids=str)
@BOTH_PATHS
def test_large_mean_normalizes_exactly(spy, shape, fused):
    # |mean| = 1e4 std: float32 sums of the raw values lose the variance
    # entirely on the larger batch (TF's and ATen's kernels give an output
    # std near 0.3 there); the fast path must still normalize.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=shape)).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=0.0, fused=fused)
    y = _numpy(layer(x, training=True)).astype(np.float64)
    _check_ran(spy, fused)
    assert np.all(np.isfinite(y))
    flat = y.reshape(-1, shape[-1])
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-3)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-3)
    y_ref, mu, var = ref.forward_train(x, (3,), np.ones(shape[-1]),
                                       np.zeros(shape[-1]), EPS)
    ref.assert_close(y, y_ref, tol=1e-3, what="outputs (float64)")
    np.testing.assert_allclose(_numpy(layer.moving_mean), mu.ravel(),
                               rtol=1e-6)
    np.testing.assert_allclose(_numpy(layer.moving_variance), var.ravel(),
                               rtol=1e-3)


def test_large_moving_mean_inference_is_exact():
    # Inference with moving mean 1e4 and variance 1: x - mean must not
    # lose the deviations' bits (x * a + (beta - mean * a) would, by 1e-4).
    rng = np.random.default_rng(11)
    x = (1e4 + rng.normal(size=(64, 4, 4, 8))).astype("float32")
    layer = keras_bn.BatchNormalization()
    layer.build(x.shape)
    layer.moving_mean.assign(np.full(8, 1e4, "float32"))
    y = _numpy(layer(x, training=False))
    expected = ref.forward_infer(x, (3,), np.ones(8), np.zeros(8),
                                 np.full(8, 1e4), np.ones(8), EPS)
    ref.assert_close(y, expected, tol=1e-6, what="outputs")


def test_inference_follows_moving_statistics_as_they_change():
    # The same layer and input, inferred after each change of its moving
    # statistics (assign, then a training step): every output must use the
    # statistics of that moment, also where a backend remembers whether
    # they are far from zero (PyTorch, to spare a host sync per call).
    rng = np.random.default_rng(12)
    x = (1e4 + rng.normal(size=(32, 2, 2, 4))).astype("float32")
    ones, zeros = np.ones(4), np.zeros(4)
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer.build(x.shape)

    def check(mean, variance, what):
        y = _numpy(layer(x, training=False))
        expected = ref.forward_infer(x, (3,), ones, zeros, mean, variance,
                                     EPS)
        ref.assert_close(y, expected, tol=1e-6, what=what)

    check(zeros, ones, "initial statistics")
    layer.moving_mean.assign(np.full(4, 1e4, "float32"))
    check(np.full(4, 1e4), ones, "after assigning a large mean")
    layer.moving_variance.assign(np.full(4, 4.0, "float32"))
    check(np.full(4, 1e4), np.full(4, 4.0), "after assigning a variance")
    layer(x, training=True)
    _, mu, var = ref.batch_stats(x, (3,))
    mean, variance = _moving(layer)
    # The float32 weights hold the update to their rounding (1e-3 at 1e4);
    # inference must then use exactly what they hold.
    np.testing.assert_allclose(mean, 0.5 * 1e4 + 0.5 * mu.ravel(), rtol=1e-7)
    np.testing.assert_allclose(variance, 2.0 + 0.5 * var.ravel(), rtol=1e-5)
    check(mean, variance, "after a training step")


@BOTH_PATHS
def test_large_mean_gradients_match_reference_path(spy, fused):
    rng = np.random.default_rng(3)
    shape = (16, 3, 3, 4)
    fast, slow = _pair(rng, shape, fused=fused)
    x = (-1e4 + rng.normal(size=shape) * 0.5).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    got = _run(fast, x, dy)
    _check_ran(spy, fused)
    want = _run(slow, x, dy)
    _assert_same(got.outputs, want.outputs, 1e-4, "outputs")
    # dx scales with gamma / std = 2 / 0.5 here.
    _assert_same(got.dx, want.dx, 1e-4, "d inputs")
    for name in got.grads:
        _assert_same(got.grads[name], want.grads[name], 1e-4, f"d {name}")


@BOTH_PATHS
def test_empty_and_nan_batches_leave_moving_statistics(spy, fused):
    layer = keras_bn.BatchNormalization(momentum=0.5, fused=fused)
    layer.build((None, 2, 2, 3))
    before = _moving(layer)
    y = layer(np.zeros((0, 2, 2, 3), "float32"), training=True)
    assert tuple(y.shape) == (0, 2, 2, 3)
    for a, b in zip(_moving(layer), before):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(4).normal(size=(8, 2, 2, 3)).astype("float32")
    x[3, 1, 0, 1] = np.nan
    spy.clear()
    layer(x, training=True)
    _check_ran(spy, fused)
    mean, var = _moving(layer)
    assert mean[1] == before[0][1] and var[1] == before[1][1]
    _, mu, v = ref.batch_stats(np.delete(x, 1, axis=3), (3,))
    ref.assert_close(mean[[0, 2]], 0.5 * mu.ravel(), what="moving mean")
    ref.assert_close(var[[0, 2]], 0.5 + 0.5 * v.ravel(),
                     what="moving variance")


@pytest.mark.parametrize("options", [
    {"renorm": True},
    {"virtual_batch_size": 4},
    {"axis": [1, 3]},
    {"mask": True},
], ids=lambda o: next(iter(o)))
def test_declines_where_it_would_change_results(spy, options):
    options = dict(options)
    use_mask = options.pop("mask", False)
    rng = np.random.default_rng(5)
    shape = (8, 3, 2, 4)
    fast, slow = _pair(rng, shape, **options)
    x = rng.normal(size=shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    mask = (rng.uniform(size=shape[:3]) > 0.3) if use_mask else None
    got = _run(fast, x, dy, mask=mask)
    assert ("fused_train", True) not in spy
    want = _run(slow, x, dy, mask=mask)
    np.testing.assert_array_equal(got.outputs, want.outputs)
    np.testing.assert_array_equal(got.dx, want.dx)
    for name in got.grads:
        np.testing.assert_array_equal(got.grads[name], want.grads[name])
    assert got.moving.keys() == want.moving.keys()
    for name in got.moving:
        np.testing.assert_array_equal(got.moving[name], want.moving[name])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF's CPU size floor")
def test_tf_small_tensors_take_the_reference_path_on_cpu():
    from keras_bn.backends import tensorflow_backend

    if tensorflow_backend._has_gpu():
        pytest.skip("the size floor applies on CPU only")
    floor = paths.TF_MIN_KERNEL_SIZE_CPU
    small = keras.ops.zeros((floor // 64 - 1, 64))
    large = keras.ops.zeros((floor // 64, 64))
    layer = keras_bn.BatchNormalization(axis=1, fused=True)
    for training in (True, False):
        path = layer.which_path(small, training=training)
        assert path.name == "reference", path
        assert "fewer than" in dict(path.declined)["kernel"], path
        assert layer.which_path(large, training=training).name == "kernel"


@pytest.mark.skipif(BACKEND == "jax", reason="JAX has no float64 unless "
                    "jax_enable_x64 is set, and these tests run without it")
def test_float64_inputs_take_the_reference_path(spy):
    layer = keras_bn.BatchNormalization(dtype="float64", fused=True)
    x = np.random.default_rng(6).normal(size=(8, 3))
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    assert not any(ran for _, ran in spy)
    expected, _, _ = ref.forward_train(x, (1,), np.ones(3), np.zeros(3), EPS)
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("offset", [0.5, 300.0])
@BOTH_PATHS
def test_half_precision_matches_reference_path(spy, dtype, offset, fused):
    rng = np.random.default_rng(7)
    shape = (16, 3, 3, 4)
    policy = f"mixed_{dtype}"
    fast, slow = _pair(rng, shape, fused=fused, dtype=policy)
    w0 = weights64(fast)
    x = keras.ops.cast(rng.normal(size=shape) * 3.0 + offset, dtype)
    x_seen = _numpy(x).astype(np.float64)  # the half-precision values
    y_fast = fast(x, training=True)
    _check_ran(spy, fused)
    y_slow = slow(x, training=True)
    assert keras.backend.standardize_dtype(y_fast.dtype) == dtype
    # Within two roundings of the output to the half type (its unit
    # roundoff is 2^-8 for bfloat16, 2^-11 for float16).
    tol = 2.0**-7 if dtype == "bfloat16" else 2.0**-9
    _assert_same(_numpy(y_fast), _numpy(y_slow), tol, "outputs")
    y_ref, mu, var = ref.forward_train(x_seen, (3,), w0["gamma"], w0["beta"],
                                       EPS)
    ref.assert_close(_numpy(y_fast), y_ref, tol=tol, what="outputs (float64)")
    # Statistics in float32 whatever the input.
    for a, b in zip(_moving(fast), _moving(slow)):
        _assert_same(a, b, 1e-5, "moving statistics")
    for a, name, batch in zip(_moving(fast), ("moving_mean",
                                              "moving_variance"), (mu, var)):
        ref.assert_close(a, ref.ema(w0[name], batch.ravel(), 0.5),
                         what=f"{name} (float64)")
    out_fast = _numpy(fast(x, training=False))
    _assert_same(out_fast, _numpy(slow(x, training=False)), tol,
                 "inference outputs")
    mean, variance = _moving(fast)
    ref.assert_close(out_fast, ref.forward_infer(
        x_seen, (3,), w0["gamma"], w0["beta"], mean, variance, EPS), tol=tol,
        what="inference outputs (float64)")


@pytest.mark.parametrize("mode", _execution.modes())
@pytest.mark.parametrize("offset", [0.5, 3e3], ids=["small", "offset"])
@BOTH_PATHS
def test_every_mode_matches_reference_path(spy, mode, offset, fused):
    """Each of the backend's execution modes (eager, tf.function and XLA
    with the batch size unknown as in model.fit, jax.jit, torch.compile):
    the fast path's training outputs, gradients and moving statistics
    against the eager reference path's and float64, then inference in the
    same mode. A large common offset: XLA's own lowering forms
    E[x^2] - E[x]^2."""
    rng = np.random.default_rng(8)
    shape = (32, 4, 4, 3)
    fast, slow = _pair(rng, shape, fused=fused)
    w0 = weights64(fast)
    x = (offset + rng.normal(size=shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    got = _run(fast, x, dy, mode=mode, unknown_batch=True)
    _check_ran(spy, fused, mode=mode)
    want = _run(slow, x, dy)
    _assert_same(got.outputs, want.outputs, 1e-5, "outputs")
    _assert_same(got.dx, want.dx, 1e-4, "d inputs")
    for name in want.grads:
        _assert_same(got.grads[name], want.grads[name], 1e-4, f"d {name}")
    for name in want.moving:
        _assert_same(got.moving[name], want.moving[name], 1e-5, name)
    _check_float64(got, w0, x, dy, 3, 0.5, 1e-4)
    spy.clear()
    infer = _execution.run(fast, x, mode=mode, training=False, grad=False,
                           unknown_batch=True)
    moving = weights64(fast)
    expected = ref.forward_infer(x, (3,), w0["gamma"], w0["beta"],
                                 moving["moving_mean"],
                                 moving["moving_variance"], EPS)
    ref.assert_close(infer.outputs, expected, tol=1e-5,
                     what="inference outputs (float64)")


@pytest.mark.parametrize("mode", _execution.modes())
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@BOTH_PATHS
def test_half_precision_gradients_in_every_mode(spy, mode, dtype, fused):
    """Half-precision training with gradients in each execution mode,
    against float64: outputs and dx within two roundings to the half type,
    d gamma and d beta (float32 weights) within 1e-5."""
    rng = np.random.default_rng(14)
    shape = (16, 3, 3, 4)
    layer = keras_bn.BatchNormalization(momentum=0.5, fused=fused,
                                        dtype=f"mixed_{dtype}")
    layer.build(shape)
    w0 = weights64(randomize_bn(layer, rng))
    x = keras.ops.cast(rng.normal(size=shape) * 3.0 + 0.5, dtype)
    dy = keras.ops.cast(rng.normal(size=shape), dtype)
    x_seen, dy_seen = (_numpy(t).astype(np.float64) for t in (x, dy))
    result = _run(layer, x, dy, mode=mode)
    _check_ran(spy, fused, mode=mode)
    assert result.dtype == dtype
    tol = 2.0**-7 if dtype == "bfloat16" else 2.0**-9
    ref.assert_training_call(result, x_seen, dy_seen, (3,), w0, EPS, 0.5,
                             tol=tol)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF's grouped statistics")
@pytest.mark.parametrize("rows", [1, 3, 4, 10, 23])
@pytest.mark.parametrize("offset", [0.5, 1e4])
def test_tf_grouped_statistics_match_float64_for_any_batch(
        spy, monkeypatch, rows, offset):
    """Groups of 4 rows or fewer plus a remainder group (none for 4 rows;
    1 row: a single group of 1), batch size unknown when traced, against
    the float64 reference: the grouping and pooling lose nothing."""
    from keras_bn.backends import tensorflow_backend

    monkeypatch.setattr(tensorflow_backend, "_GROUP_ROWS", 4)
    monkeypatch.setattr(tensorflow_backend, "_KERNEL_GROUP_ROWS", 4)
    rng = np.random.default_rng(13)
    shape = (rows, 5)
    x = (offset + rng.normal(size=shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    gamma = rng.uniform(0.5, 1.5, 5)
    beta = rng.normal(size=5)
    # skip_nonfinite_updates=False: one row's statistics update the moving
    # ones too (by default they would not: test_small_batches).
    layer = keras_bn.BatchNormalization(momentum=0.0,
                                        skip_nonfinite_updates=False)
    layer.build((None, 5))
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))

    result = _run(layer, x, dy, mode="function", unknown_batch=True)
    _check_ran(spy, None)
    _assert_float64_training(result, x, dy, 1, gamma, beta, mean_tol=1e-7)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's grouped view")
@pytest.mark.parametrize("shape,groups", [
    ((10, 7, 7, 8), 49),   # 490 rows: the widest view that divides them
    ((64, 4, 4, 16), 32),
    ((17, 1, 1, 4), 17),   # prime rows: one row of 17 groups
    ((19, 1, 1, 32), 1),   # no divisor of 19 up to 16: the plain layout
])
@pytest.mark.parametrize("offset", [0.5, 1e4])
def test_jax_grouped_view_matches_float64(spy, shape, groups, offset):
    """The xla kernel reads a channels-last input with few channels as
    `[rows / k, k * channels]` and pools the k groups' sums: against the
    float64 reference, outputs, gradients and statistics lose nothing,
    whatever k the row count allows."""
    from keras_bn.backends import jax_backend

    assert jax_backend._groups(shape, 3) == groups
    rng = np.random.default_rng(14)
    channels = shape[-1]
    x = (offset + rng.normal(size=shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer.build(shape)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    result = _run(layer, x, dy)
    _check_ran(spy, None)
    _assert_float64_training(result, x, dy, 3, gamma, beta, mean_tol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="torch layout")
@BOTH_PATHS
def test_torch_channels_last_view_and_autograd(spy, fused):
    import torch

    rng = np.random.default_rng(10)
    shape = (4, 5, 6, 3)
    fast, slow = _pair(rng, shape, fused=fused)
    x = torch.tensor(rng.normal(size=shape).astype("float32"),
                     requires_grad=True)
    y = fast(x, training=True)
    assert ("fused_train", True) in spy
    # NHWC in, NHWC out, with NHWC (row-major) strides: no stray layout.
    assert tuple(y.shape) == shape and y.is_contiguous()
    (y * y.detach()).sum().backward()
    assert x.grad is not None and x.grad.is_contiguous()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = slow(x2, training=True)
    (y2 * y2.detach()).sum().backward()
    _assert_same(x.grad.numpy(), x2.grad.numpy(), 1e-5, "d inputs")


@pytest.mark.parametrize("mode", _execution.modes())
def test_default_training_is_exact_on_long_reductions(spy, mode):
    """ReLU-like activations, 57,600 values a channel (a CIFAR conv layer's
    batch of 64): by default training is within 1e-5 of float64 on outputs,
    gradients and statistics, on the backend's exact fast path, in every
    mode (also TensorFlow's under XLA, whose lowering of chained reductions
    forms one long float32 sum again). The backends' kernels as they are
    (fused=True) sum in float32 and land 3e-4 (outputs) to 1e-3 (dx) away on
    TensorFlow and PyTorch CPU."""
    rng = np.random.default_rng(12)
    shape = (64, 30, 30, 8)
    x = np.maximum(rng.normal(0.1, 0.3, size=shape), 0.0).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer.build(shape)
    result = _run(layer, x, dy, mode=mode)
    _check_ran(spy, None, mode=mode)
    _assert_float64_training(result, x, dy, 3, np.ones(8), np.zeros(8),
                             mean_tol=1e-6)

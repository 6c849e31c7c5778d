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
from keras_bn import paths
from tests import reference as ref
from tests.autodiff import call_with_grads

BACKEND = keras.backend.backend()
EPS = 1e-3


@pytest.fixture
def spy(fused_calls, monkeypatch):
    """`fused_calls` (per kernel call, whether it ran).

    TensorFlow's CPU kernels and JAX's xla kernel leave small tensors to
    the reference path (it is as fast there); the size floors are lifted so
    that the kernels run on the small tensors of these tests. Its exact path pools groups of
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
    for v in fast.weights:
        value = rng.uniform(0.5, 1.5, tuple(v.shape))
        if "mean" in v.name or v.name == "beta":
            value = rng.normal(0.0, 0.5, tuple(v.shape))
        v.assign(value.astype("float32"))
    slow.set_weights(fast.get_weights())
    return fast, slow


def _grads(layer, x, dy, mask=None):
    """`call_with_grads`, compiled as one XLA program under JAX (op-by-op
    dispatch compiles every primitive separately, which is slow)."""
    if BACKEND != "jax":
        return call_with_grads(layer, x, dy, mask=mask)
    import jax
    import jax.numpy as jnp

    trainable = [w.value for w in layer.trainable_weights]
    non_trainable = [w.value for w in layer.non_trainable_weights]

    @jax.jit
    def run(x, trainable, mask):
        def loss(x, trainable):
            y, new = layer.stateless_call(trainable, non_trainable, x,
                                          training=True, mask=mask)
            return jnp.sum(y.astype("float32") * dy), (y, new)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, trainable)

    (_, (y, new)), (dx, dw) = run(jnp.asarray(x), trainable, mask)
    for var, value in zip(layer.non_trainable_weights, new):
        var.assign(value)
    names = [w.name for w in layer.trainable_weights]
    return (np.asarray(y), np.asarray(dx),
            {n: np.asarray(g) for n, g in zip(names, dw)})


def _numpy(t):
    return keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))


def _moving(layer):
    return [_numpy(layer.moving_mean), _numpy(layer.moving_variance)]


def _assert_same(a, b, tol, what):
    ref.assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64),
                     tol=tol, what=what)


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


def _check_ran(spy, fused, channels_last=True):
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
    x = (rng.normal(size=shape) * 3.0 + 2.0).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    y_fast, dx_fast, g_fast = _grads(fast, x, dy)
    _check_ran(spy, fused, channels_last=axis in (-1, len(shape) - 1))
    y_slow, dx_slow, g_slow = _grads(slow, x, dy)
    _assert_same(y_fast, y_slow, 1e-5, "outputs")
    _assert_same(dx_fast, dx_slow, 1e-5, "d inputs")
    assert g_fast.keys() == g_slow.keys()
    for name in g_fast:
        _assert_same(g_fast[name], g_slow[name], 1e-5, f"d {name}")
    for a, b, name in zip(_moving(fast), _moving(slow), ("mean", "variance")):
        _assert_same(a, b, 1e-5, f"moving {name}")
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
    layer = keras_bn.BatchNormalization(momentum=0.5, fused=True,
                                        beta_initializer="ones")
    x = np.array([[3.0, -7.0]], "float32")
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
    _, mu, var = ref.batch_stats(x, (3,))
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
    y_fast, dx_fast, g_fast = _grads(fast, x, dy)
    _check_ran(spy, fused)
    y_slow, dx_slow, g_slow = _grads(slow, x, dy)
    _assert_same(y_fast, y_slow, 1e-4, "outputs")
    # dx scales with gamma / std = 2 / 0.5 here.
    _assert_same(dx_fast, dx_slow, 1e-4, "d inputs")
    for name in g_fast:
        _assert_same(g_fast[name], g_slow[name], 1e-4, f"d {name}")


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
    y_fast, dx_fast, g_fast = _grads(fast, x, dy, mask=mask)
    assert ("fused_train", True) not in spy
    y_slow, dx_slow, g_slow = _grads(slow, x, dy, mask=mask)
    np.testing.assert_array_equal(y_fast, y_slow)
    np.testing.assert_array_equal(dx_fast, dx_slow)
    for a, b in zip(_moving(fast), _moving(slow)):
        np.testing.assert_array_equal(a, b)


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
    x = keras.ops.cast(rng.normal(size=shape) * 3.0 + offset, dtype)
    y_fast = fast(x, training=True)
    _check_ran(spy, fused)
    y_slow = slow(x, training=True)
    assert keras.backend.standardize_dtype(y_fast.dtype) == dtype
    # Within two roundings of the output to the half type (its unit
    # roundoff is 2^-8 for bfloat16, 2^-11 for float16).
    tol = 2.0**-7 if dtype == "bfloat16" else 2.0**-9
    _assert_same(_numpy(y_fast), _numpy(y_slow), tol, "outputs")
    # Statistics in float32 whatever the input.
    for a, b in zip(_moving(fast), _moving(slow)):
        _assert_same(a, b, 1e-5, "moving statistics")
    out_fast = _numpy(fast(x, training=False))
    _assert_same(out_fast, _numpy(slow(x, training=False)), tol,
                 "inference outputs")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function / XLA")
@pytest.mark.parametrize("jit_compile", [False, True])
@BOTH_PATHS
def test_tf_function_and_xla(spy, jit_compile, fused):
    import tensorflow as tf

    rng = np.random.default_rng(8)
    shape = (32, 4, 4, 3)
    fast, slow = _pair(rng, shape, fused=fused)
    # A large common offset: XLA's own lowering forms E[x^2] - E[x]^2.
    x = tf.constant((3e3 + rng.normal(size=shape)).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))

    def step(layer):
        # Unknown batch size, as in model.fit.
        @tf.function(jit_compile=jit_compile, input_signature=[
            tf.TensorSpec((None,) + shape[1:], tf.float32)])
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            variables = [w.value for w in layer.trainable_weights]
            return y, tape.gradient(y, [x] + variables, output_gradients=dy)

        return run(x)

    y_fast, g_fast = step(fast)
    _check_ran(spy, fused)
    y_slow, g_slow = step(slow)
    _assert_same(y_fast.numpy(), y_slow.numpy(), 1e-5, "outputs")
    for a, b in zip(g_fast, g_slow):
        _assert_same(a.numpy(), b.numpy(), 1e-4, "gradients")
    for a, b in zip(_moving(fast), _moving(slow)):
        _assert_same(a, b, 1e-5, "moving statistics")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF's grouped statistics")
@pytest.mark.parametrize("rows", [1, 3, 4, 10, 23])
@pytest.mark.parametrize("offset", [0.5, 1e4])
def test_tf_grouped_statistics_match_float64_for_any_batch(
        spy, monkeypatch, rows, offset):
    """Groups of 4 rows or fewer plus a remainder group (none for 4 rows;
    1 row: a single group of 1), batch size unknown when traced, against
    the float64 reference: the grouping and pooling lose nothing."""
    import tensorflow as tf

    from keras_bn.backends import tensorflow_backend

    monkeypatch.setattr(tensorflow_backend, "_GROUP_ROWS", 4)
    monkeypatch.setattr(tensorflow_backend, "_KERNEL_GROUP_ROWS", 4)
    rng = np.random.default_rng(13)
    shape = (rows, 5)
    x = (offset + rng.normal(size=shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    gamma = rng.uniform(0.5, 1.5, 5)
    beta = rng.normal(size=5)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer.build((None, 5))
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 5), tf.float32)])
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, [x, layer.gamma.value, layer.beta.value],
                                output_gradients=dy)

    y, (dx, dgamma, dbeta) = run(tf.constant(x))
    _check_ran(spy, None)
    expected, mu, var = ref.forward_train(x, (1,), gamma, beta, EPS)
    ref.assert_close(y.numpy(), expected, tol=1e-5, what="outputs")
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(x, dy, (1,), gamma,
                                                       EPS)
    ref.assert_close(dx.numpy(), dx_ref, tol=1e-5, what="d inputs")
    ref.assert_close(dgamma.numpy(), dgamma_ref, tol=1e-5, what="d gamma")
    ref.assert_close(dbeta.numpy(), dbeta_ref, tol=1e-5, what="d beta")
    mean, variance = _moving(layer)
    ref.assert_close(mean, mu.ravel(), tol=1e-7, what="moving mean")
    ref.assert_close(variance, var.ravel(), tol=1e-6, what="moving variance")


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit")
def test_jax_jit_and_grad(spy):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(9)
    shape = (16, 3, 3, 4)
    fast, slow = _pair(rng, shape)
    x = jnp.asarray(rng.normal(size=shape).astype("float32") + 50.0)

    def loss_and_grads(layer):
        tv = [w.value for w in layer.trainable_weights]
        ntv = [w.value for w in layer.non_trainable_weights]

        @jax.jit
        def run(tv, x):
            def loss(tv, x):
                y, new = layer.stateless_call(tv, ntv, x, training=True)
                return jnp.sum(jnp.sin(y)), new

            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                tv, x)

        (value, new), grads = run(tv, x)
        return value, jax.tree_util.tree_leaves(grads), new

    v_fast, g_fast, n_fast = loss_and_grads(fast)
    assert ("fused_train", True) in spy
    v_slow, g_slow, n_slow = loss_and_grads(slow)
    _assert_same(v_fast, v_slow, 1e-5, "loss")
    for a, b in zip(g_fast, g_slow):
        _assert_same(a, b, 1e-5, "gradients")
    for a, b in zip(n_fast, n_slow):
        _assert_same(a, b, 1e-5, "moving statistics")


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


def _tf_xla_grads(layer, x, dy):
    """`call_with_grads` compiled with XLA (TensorFlow)."""
    import tensorflow as tf

    variables = [w.value for w in layer.trainable_weights]

    @tf.function(jit_compile=True)
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, [x] + variables, output_gradients=dy)

    y, (dx, *grads) = run(tf.constant(x))
    names = [w.name for w in layer.trainable_weights]
    return y.numpy(), dx.numpy(), {n: g.numpy() for n, g in zip(names, grads)}


@pytest.mark.parametrize("xla", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        BACKEND != "tensorflow", reason="TensorFlow's XLA path")),
], ids=["default", "xla"])
def test_default_training_is_exact_on_long_reductions(spy, xla):
    """ReLU-like activations, 57,600 values a channel (a CIFAR conv layer's
    batch of 64): by default training is within 1e-5 of float64 on outputs,
    gradients and statistics, on the backend's exact fast path (also
    TensorFlow's under XLA, whose lowering of chained reductions forms one
    long float32 sum again). The backends' kernels as they are
    (fused=True) sum in float32 and land 3e-4 (outputs) to 1e-3 (dx) away on
    TensorFlow and PyTorch CPU."""
    rng = np.random.default_rng(12)
    shape = (64, 30, 30, 8)
    x = np.maximum(rng.normal(0.1, 0.3, size=shape), 0.0).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer.build(shape)
    if xla:
        y, dx, grads = _tf_xla_grads(layer, x, dy)
    else:
        y, dx, grads = _grads(layer, x, dy)
    _check_ran(spy, None)
    ones, zeros = np.ones(8), np.zeros(8)
    expected, mu, var = ref.forward_train(x, (3,), ones, zeros, EPS)
    ref.assert_close(y, expected, tol=1e-5, what="outputs")
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(x, dy, (3,), ones, EPS)
    ref.assert_close(dx, dx_ref, tol=1e-5, what="d inputs")
    ref.assert_close(grads["gamma"], dgamma_ref, tol=1e-5, what="d gamma")
    ref.assert_close(grads["beta"], dbeta_ref, tol=1e-5, what="d beta")
    mean, variance = _moving(layer)
    ref.assert_close(mean, mu.ravel(), tol=1e-6, what="moving mean")
    ref.assert_close(variance, var.ravel(), tol=1e-6, what="moving variance")

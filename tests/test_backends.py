"""The backend contract (`keras_bn.backends.Backend`), on the current backend.

Every kernel a backend offers is called directly, as the layer calls it,
and checked against the float64 NumPy reference.
"""

from __future__ import annotations

import zlib

import keras
import numpy as np
import pytest

from keras_bn import backends
from keras_bn import paths
from tests import reference as ref

BACKEND = keras.backend.backend()
MODULE = backends.get()
EPS = 1e-3
# Channels last and first, rank 2 and 4; 2048 rows is past every group
# length, so the exact kernels pool several groups.
SHAPES = [((2048, 6), 1), ((8, 16, 16, 6), 3), ((8, 6, 16, 16), 1)]


def _inputs(shape, axis, seed_text):
    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    channels = shape[axis]
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, channels).reshape(
        [channels if i == axis else 1 for i in range(len(shape))]) + 3.0
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    return x.astype("float32"), gamma.astype("float32"), beta.astype("float32")


def test_module_implements_the_contract():
    assert isinstance(MODULE.SEES_GLOBAL_BATCH, bool)
    assert MODULE.num_replicas() == 1  # no distribution in this process
    for table in (MODULE.TRAIN, MODULE.INFER):
        assert set(table) <= {paths.KERNEL, paths.EXACT_KERNEL, paths.XLA}
        assert all(callable(k) for k in table.values())
    fields = set(paths.Call.__dataclass_fields__)
    context = MODULE.context()
    assert isinstance(context, dict) and set(context) <= fields, context
    # Resolved once: the same module object on every lookup.
    assert backends.get() is MODULE


def test_every_path_the_rules_name_has_a_kernel():
    for (backend, training), rows in paths.RULES.items():
        if backend != BACKEND:
            continue
        table = MODULE.TRAIN if training else MODULE.INFER
        for path, *_ in rows:
            assert path in table, (backend, training, path)


def test_cross_replica_without_a_distribution_is_the_identity():
    count = keras.ops.convert_to_tensor(np.full(3, 4.0, "float32"))
    shift = keras.ops.convert_to_tensor(np.array([1.0, 2.0, 3.0], "float32"))
    delta = keras.ops.convert_to_tensor(np.array([0.1, 0.2, 0.3], "float32"))
    m2 = keras.ops.convert_to_tensor(np.array([1.0, 2.0, 4.0], "float32"))
    out = MODULE.cross_replica(count, shift, delta, m2)
    for got, want in zip(out, (count, delta, m2)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got),
                                      keras.ops.convert_to_numpy(want))


def _train_cases():
    """`(kernel, shape, axis)`: the exact kernels take channels-last data
    (the rules send them nothing else) except JAX's, which takes any."""
    return [(name, shape, axis) for name in sorted(MODULE.TRAIN)
            for shape, axis in SHAPES
            if name == paths.KERNEL or BACKEND == "jax"
            or axis == len(shape) - 1]


# The kernel as it is (fused=True) sums long channels in float32: it is
# held to the looser bound its documentation gives.
TOL = {paths.KERNEL: 1e-4}


@pytest.mark.skipif(not MODULE.TRAIN, reason="no training kernel here")
@pytest.mark.parametrize("name,shape,axis", _train_cases(), ids=str)
def test_train_kernel_matches_float64(name, shape, axis):
    x, gamma, beta = _inputs(shape, axis, f"{BACKEND}-{name}-{shape}")
    kernel = MODULE.TRAIN[name]
    run = (lambda *a: kernel(*a, EPS, axis))
    if BACKEND == "tensorflow" and name == paths.XLA:
        import tensorflow as tf

        run = tf.function(run, jit_compile=True)
    y, mean, var = run(*(keras.ops.convert_to_tensor(t)
                         for t in (x, gamma, beta)))
    want_y, want_mean, want_var = ref.forward_train(x, (axis,), gamma, beta,
                                                    EPS)
    tol = TOL.get(name, 1e-5)
    ref.assert_close(keras.ops.convert_to_numpy(y), want_y, tol, what="y")
    for got, want, what in ((mean, want_mean, "mean"), (var, want_var, "var")):
        got = keras.ops.convert_to_numpy(got)
        assert got.shape == (shape[axis],) and got.dtype == np.float32, what
        ref.assert_close(got, want.ravel(), tol, what=what)


@pytest.mark.skipif(not MODULE.INFER, reason="no inference kernel here")
@pytest.mark.parametrize("name", sorted(MODULE.INFER))
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
def test_infer_kernel_matches_float64(name, shape, axis):
    x, gamma, beta = _inputs(shape, axis, f"{BACKEND}-infer-{shape}")
    mean = np.linspace(2.0, 4.0, shape[axis]).astype("float32")
    var = np.linspace(0.5, 2.0, shape[axis]).astype("float32")
    y = MODULE.INFER[name](*(keras.ops.convert_to_tensor(t) for t in
                             (x, mean, var, gamma, beta)), EPS, axis)
    p = lambda v: ref.param(v, x, (axis,))  # noqa: E731
    want = (x - p(mean)) / np.sqrt(p(var) + EPS) * p(gamma) + p(beta)
    ref.assert_close(keras.ops.convert_to_numpy(y), want, what="y")


@pytest.mark.parametrize("stateless", [False, True])
@pytest.mark.parametrize("guarded", [False, True])
def test_assign_moving_average_matches_float64(guarded, stateless):
    """The assigned value and the returned one; skipped channels keep their
    old value exactly. In a StatelessScope the scope collects the update
    and the variable itself is untouched (a backend writing storage in
    place must not)."""
    rng = np.random.default_rng(zlib.crc32(f"{BACKEND}-ema".encode()))
    old = rng.normal(size=6).astype("float32")
    value = rng.normal(size=6).astype("float32")
    ok = np.array([True, False, True, True, False, True])
    if guarded:
        value[~ok] = np.nan  # what the guard exists for
    t = keras.ops.convert_to_tensor
    variable = keras.Variable(old, trainable=False)
    args = (variable, t(value), 0.9, t(ok) if guarded else None)
    if stateless:
        with keras.StatelessScope() as scope:
            returned = MODULE.assign_moving_average(*args)
            assigned = scope.get_current_value(variable)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), old)
    else:
        returned = MODULE.assign_moving_average(*args)
        assigned = variable.value
    want = old * 0.9 + value.astype("float64") * (1 - 0.9)
    if guarded:
        want = np.where(ok, want, old)
    for name, got in (("returned", returned), ("assigned", assigned)):
        got = keras.ops.convert_to_numpy(got)
        assert got.dtype == np.float32, name
        ref.assert_close(got, want, 1e-6, what=f"{name} moving average")
        if guarded:
            np.testing.assert_array_equal(got[~ok], old[~ok])

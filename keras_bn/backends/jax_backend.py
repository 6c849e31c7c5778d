"""JAX: the batch shards of `keras.distribution`, and the `xla` kernel.

XLA has no batch-norm kernel to call, so the training kernel is the
reference algorithm written for XLA's fusion: the statistics are two
reductions that each read `x` once (no materialized deviation tensor), and
a custom VJP gives the backward as two reductions and one elementwise pass
(`_shared.input_gradient`), where autodiff would materialize
intermediates. Inference needs no kernel: the reference path is one fused
elementwise pass under XLA.
"""

import functools
import math

import jax
import jax.numpy as jnp
import keras

from keras_bn import paths
from keras_bn.backends import _shared

# Under `keras.distribution`, JAX compiles one program over globally sharded
# arrays (GSPMD): a reduction over the batch axis inside a layer already
# spans every device's shard, so plain batch statistics are global.
SEES_GLOBAL_BATCH = True


def num_replicas() -> int:
    """Batch shards of the active `keras.distribution` (1 if none)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    name = distribution.batch_dim_name
    if name is None or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[list(mesh.axis_names).index(name)])


def context() -> dict:
    return {}


def cross_replica(count, shift, delta, m2, group_size=None):
    # Statistics are global already (see SEES_GLOBAL_BATCH); the layer
    # regroups the global batch for `group_size` instead.
    return count, delta, m2


def _leading_mean(x, axes):
    first = axes[0]
    rows = _shared.leading_rows(x.shape[first])
    head = jax.lax.slice_in_dim(x, 0, rows, axis=first)
    return head.mean(axis=axes, keepdims=True)


def _bn_forward(x, gamma, beta, epsilon, axes):
    """`(y, shifts, delta, variance, inv)`; the mean is `shift + delta`."""
    n = max(math.prod(x.shape[a] for a in axes), 1)
    shift = jax.lax.stop_gradient(_leading_mean(x, axes))
    # One copy of the shift per pass over `x`, hidden from XLA's CSE: with
    # a single `x - shift` shared by several passes XLA materializes it (a
    # full-size write) instead of fusing it into each reduction.
    shifts = jax.lax.optimization_barrier((shift,) * 4)
    s1 = jnp.sum(x - shifts[0], axis=axes, keepdims=True)
    s2 = jnp.sum(jnp.square(x - shifts[1]), axis=axes, keepdims=True)
    delta = s1 / n
    variance = jnp.maximum(s2 - s1 * delta, 0.0) / n
    inv = jax.lax.rsqrt(variance + epsilon)
    # (x - shift) - delta, as in the reference path: exact even where the
    # mean itself is not representable to the deviations' precision.
    y = ((x - shifts[2]) - delta) * (inv * gamma) + beta
    return y, shifts, delta, variance, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _train(x, gamma, beta, epsilon, axes, out_dtype):
    y, shifts, delta, variance, _ = _bn_forward(x, gamma, beta, epsilon, axes)
    return y.astype(out_dtype), shifts[0] + delta, variance


def _train_fwd(x, gamma, beta, epsilon, axes, out_dtype):
    # The residuals are the input and per-channel vectors only.
    y, shifts, delta, variance, inv = _bn_forward(
        x, gamma, beta, epsilon, axes)
    res = (x, gamma, shifts[2:], delta, inv)
    return (y.astype(out_dtype), shifts[0] + delta, variance), res


def _train_bwd(epsilon, axes, out_dtype, res, cotangents):
    x, gamma, (shift, other_shift), delta, inv = res
    dy, dmean, dvar = cotangents
    dy = dy.astype(x.dtype)
    n = max(math.prod(x.shape[a] for a in axes), 1)
    dbeta = jnp.sum(dy, axis=axes, keepdims=True)
    # sum(dy * centered), centered = (x - shift) - delta (see _bn_forward
    # for the second copy of the shift).
    dcentered = jnp.sum(dy * (x - other_shift), axis=axes, keepdims=True)
    dgamma = (dcentered - delta * dbeta) * inv
    centered = (x - shift) - delta
    dx = _shared.input_gradient(dy, centered, gamma, inv, dbeta, dgamma, n)
    # The direct paths of the returned mean and variance.
    dx = dx + (dmean + 2.0 * centered * dvar) / n
    return dx, dgamma, dbeta


_train.defvjp(_train_fwd, _train_bwd)


def _xla_train(x, gamma, beta, epsilon, axis):
    # Half-precision inputs: statistics and arithmetic in float32; XLA fuses
    # the conversions into the passes that read and write the tensor.
    out_dtype = x.dtype
    stat_dtype = jnp.promote_types(out_dtype, jnp.float32)
    x = x.astype(stat_dtype)
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    ones = jnp.ones(shape, stat_dtype)
    gamma = ones if gamma is None else jnp.reshape(gamma, shape)
    beta = ones * 0 if beta is None else jnp.reshape(beta, shape)
    y, mean, variance = _train(
        x, gamma.astype(stat_dtype), beta.astype(stat_dtype), epsilon, axes,
        out_dtype)
    return y, jnp.reshape(mean, (-1,)), jnp.reshape(variance, (-1,))


TRAIN = {paths.XLA: _xla_train}
INFER = {}
# Traced into the step's graph once, so keras.ops cost nothing per call.
assign_moving_average = _shared.assign_moving_average

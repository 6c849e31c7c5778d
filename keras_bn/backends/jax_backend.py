"""JAX: the batch shards of `keras.distribution`, and the `xla` kernel.

XLA has no batch-norm kernel to call, so the training kernel is the
reference algorithm written for XLA's fusion: the statistics are two
reductions that each read `x` once (no materialized deviation tensor), and
a custom VJP gives the backward as two reductions and one elementwise pass
(`_shared.gradient_coefficients`), where autodiff would materialize
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


# Channels-last conv inputs with few channels are reduced in a wider view:
# `[rows, C]` read as `[rows / k, k * C]`, per-channel vectors tiled k times,
# partial sums pooled over the k groups. XLA:CPU reduces a `[rows, 8]`
# column slowly; at 128x16x16x8 the view takes a training call with its
# gradient from 365 to 198 µs (2026-12-07). Wider channels gain nothing.
GROUP_WIDTH = 512
MIN_GROUPS = 16


def _groups(shape, axis) -> int:
    """How many channel groups the kernel's view holds side by side."""
    channels = shape[axis]
    if len(shape) < 3 or axis != len(shape) - 1 or not channels:
        return 1
    rows = math.prod(shape[:-1])
    k = min(GROUP_WIDTH // channels, rows)
    while k > 1 and rows % k:
        k -= 1
    return k if k >= MIN_GROUPS else 1


def _sum(t, axes, groups):
    """Per-channel sums over `axes`, pooling the view's groups (see
    GROUP_WIDTH): the pooled partial sums are a short second sum, which
    XLA keeps apart from the first (a reshape between them)."""
    s = jnp.sum(t, axis=axes, keepdims=True)
    if groups > 1:
        s = jnp.sum(s.reshape(groups, -1), axis=0, keepdims=True)
    return s


def _spread(v, groups):
    """A per-channel vector laid out to broadcast against the view."""
    return v if groups == 1 else jnp.tile(v, (1, groups))


def _leading_mean(x, axes, groups):
    first = axes[0]
    rows = _shared.leading_rows(x.shape[first])
    head = jax.lax.slice_in_dim(x, 0, rows, axis=first)
    return _sum(head, axes, groups) / _count(head, axes, groups)


def _count(x, axes, groups):
    """Values per channel in `x` (its view's groups included), at least 1."""
    return max(math.prod(x.shape[a] for a in axes) * groups, 1)


def _bn_forward(x, gamma, beta, epsilon, axes, groups):
    """`(y, shifts, delta, variance, inv)`; the mean is `shift + delta`.

    Per-channel results have the reduced axes kept as size 1; `shifts`
    are laid out like `x` (`_spread`).
    """
    n = _count(x, axes, groups)
    shift = jax.lax.stop_gradient(_leading_mean(x, axes, groups))
    # One copy of the shift per pass over `x`, hidden from XLA's CSE: with
    # a single `x - shift` shared by several passes XLA materializes it (a
    # full-size write) instead of fusing it into each reduction.
    shifts = jax.lax.optimization_barrier((_spread(shift, groups),) * 4)
    s1 = _sum(x - shifts[0], axes, groups)
    s2 = _sum(jnp.square(x - shifts[1]), axes, groups)
    delta = s1 / n
    variance = jnp.maximum(s2 - s1 * delta, 0.0) / n
    inv = jax.lax.rsqrt(variance + epsilon)
    # (x - shift) - delta, as in the reference path: exact even where the
    # mean itself is not representable to the deviations' precision.
    y = ((x - shifts[2]) - _spread(delta, groups)) * _spread(
        inv * gamma, groups) + _spread(beta, groups)
    return y, (shift, shifts[2], shifts[3]), delta, variance, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _train(x, gamma, beta, epsilon, axes, groups, out_dtype):
    y, shifts, delta, variance, _ = _bn_forward(
        x, gamma, beta, epsilon, axes, groups)
    return y.astype(out_dtype), shifts[0] + delta, variance


def _train_fwd(x, gamma, beta, epsilon, axes, groups, out_dtype):
    # The residuals are the input and per-channel vectors only.
    y, shifts, delta, variance, inv = _bn_forward(
        x, gamma, beta, epsilon, axes, groups)
    res = (x, gamma, shifts[1:], delta, inv)
    return (y.astype(out_dtype), shifts[0] + delta, variance), res


def _train_bwd(epsilon, axes, groups, out_dtype, res, cotangents):
    x, gamma, (shift, other_shift), delta, inv = res
    dy, dmean, dvar = cotangents
    dy = dy.astype(x.dtype)
    n = _count(x, axes, groups)
    dbeta = _sum(dy, axes, groups)
    # sum(dy * centered), centered = (x - shift) - delta (see _bn_forward
    # for the second copy of the shift).
    dcentered = _sum(dy * (x - other_shift), axes, groups)
    dgamma = (dcentered - delta * dbeta) * inv
    # dx = a * dy - k * centered - b (the paper's), plus the direct paths
    # of the returned mean and variance.
    a, k, b = _shared.gradient_coefficients(gamma, inv, dbeta, dgamma, n)
    k = k - 2.0 * dvar / n
    b = b - dmean / n
    centered = (x - shift) - _spread(delta, groups)
    dx = (_spread(a, groups) * dy - _spread(k, groups) * centered
          - _spread(b, groups))
    return dx, dgamma, dbeta


_train.defvjp(_train_fwd, _train_bwd)


def _xla_train(x, gamma, beta, epsilon, axis):
    # Half-precision inputs: statistics and arithmetic in float32; XLA fuses
    # the conversions into the passes that read and write the tensor.
    out_dtype = x.dtype
    stat_dtype = jnp.promote_types(out_dtype, jnp.float32)
    in_shape, channels = x.shape, x.shape[axis]
    groups = _groups(in_shape, axis)
    x = x.astype(stat_dtype)
    if groups > 1:
        x = x.reshape(-1, groups * channels)
        axis = 1
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = channels
    ones = jnp.ones(shape, stat_dtype)
    gamma = ones if gamma is None else jnp.reshape(gamma, shape)
    beta = ones * 0 if beta is None else jnp.reshape(beta, shape)
    y, mean, variance = _train(
        x, gamma.astype(stat_dtype), beta.astype(stat_dtype), epsilon, axes,
        groups, out_dtype)
    return (y.reshape(in_shape), jnp.reshape(mean, (-1,)),
            jnp.reshape(variance, (-1,)))


TRAIN = {paths.XLA: _xla_train}
INFER = {}
# Traced into the step's graph once, so keras.ops cost nothing per call.
assign_moving_average = _shared.assign_moving_average

"""What the backend kernels share: the shift rule, the paper's backward
and the moving-average update.

Written with arithmetic operators (and `keras.ops` where an operator cannot
say it), so the same lines run on `tf.Tensor`, JAX arrays and
`torch.Tensor`.
"""

from __future__ import annotations

import keras
from keras import ops

# A float32 kernel that sums `x` directly loses the variance once
# |mean| / std exceeds about this ratio; past it, the kernels normalize
# `x - shift` for a constant per-channel shift instead, which is exact
# because batch norm is shift invariant.
MAX_MEAN_TO_STD = 8.0

# The shift is the mean of the leading 1/64 of the batch: any subset
# holding a fraction f of the values has
# (mean_subset - mean)^2 <= var * (1 - f) / f, so the shifted data has
# |mean| / std <= 8 whatever the input.
SHIFT_FRACTION = 64


def leading_rows(rows: int):
    """How many leading rows the shift is the mean of."""
    return -(-rows // SHIFT_FRACTION)


def mean_dominates(mean, variance, epsilon: float = 0.0):
    """Per channel: |mean| > MAX_MEAN_TO_STD * sqrt(variance + epsilon).

    NaN statistics compare False: they go to the layer's finite guard.
    """
    if epsilon:
        variance = variance + epsilon
    return mean * mean > MAX_MEAN_TO_STD**2 * variance


def input_gradient(dy, centered, scale, inv, sum_dy, sum_dy_xhat, n):
    """Section 3 of the paper: the batch-norm input gradient from two sums.

    `dx = scale * inv * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)`
    with `xhat = centered * inv`, where `centered = x - mean` as the caller
    forms it most exactly; d gamma is `sum_dy_xhat` and d beta `sum_dy`.
    Returned as `a * dy - k * centered - b`, the per-channel coefficients
    `(a, k, b)` of `gradient_coefficients`.
    """
    a, k, b = gradient_coefficients(scale, inv, sum_dy, sum_dy_xhat, n)
    return a * dy - k * centered - b


def gradient_coefficients(scale, inv, sum_dy, sum_dy_xhat, n):
    """Per-channel `(a, k, b)` with `dx = a * dy - k * (x - mean) - b`."""
    a = scale * inv
    return a, a * inv * (sum_dy_xhat / n), a * (sum_dy / n)


def replica_group(gathered, replica, group_size):
    """The rows of `gathered` (one per replica, stacked on axis 0) of the
    consecutive `group_size` replicas that hold `replica` (all of them if
    `group_size` is None): what a grouped `cross_replica` pools."""
    if group_size is None:
        return gathered
    start = (replica // group_size) * group_size
    return ops.slice(gathered, (start,) + (0,) * (len(gathered.shape) - 1),
                     (group_size,) + tuple(gathered.shape[1:]))


def moving_average(old, value, momentum: float, ok):
    """`old * momentum + value * (1 - momentum)` where `ok` holds (everywhere
    if None), `old` elsewhere, in `keras.ops`."""
    new = old * momentum + value * (1.0 - momentum)
    if ok is not None:
        new = ops.where(ok, new, old)
    return new


def assign_moving_average(variable, value, momentum: float, ok,
                          read=ops.convert_to_tensor):
    """`Backend.assign_moving_average` in `keras.ops`: `variable` read once
    (`read`), the average formed in `value`'s dtype, assigned through
    `variable.assign` (so a `StatelessScope` collects it). Casts only where
    dtypes differ: on eager backends every op is a dispatch of its own."""
    old = read(variable)
    dtype = keras.backend.standardize_dtype(value.dtype)
    same = keras.backend.standardize_dtype(old.dtype) == dtype
    if not same:
        old = ops.cast(old, dtype)
    new = moving_average(old, value, momentum, ok)
    variable.assign(new if same else ops.cast(new, variable.dtype))
    return new

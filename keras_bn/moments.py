"""Batch statistics for batch normalization, written with `keras.ops` only.

Every statistic travels as a triple `(count, mean, m2)`: the number of values,
their mean and their centered sum of squares `sum((x - mean) ** 2)`. Triples
from different groups (ghost batches, replicas) combine exactly with Chan et
al.'s parallel formula, which is why nothing here ever forms
`E[x^2] - E[x]^2`: that loses all precision when `|mean| >> std` and can go
negative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras import ops


def static_count(x, axes: Sequence[int]) -> float | None:
    """Number of values per reduced slice as a Python float, or None where
    a dimension is only known when the call runs."""
    static = [x.shape[a] for a in axes]
    return None if None in static else float(math.prod(static))


def count_values(x, axes: Sequence[int]):
    """Number of values per reduced slice, as a float32 scalar tensor."""
    count = static_count(x, axes)
    if count is not None:
        return ops.convert_to_tensor(count, "float32")
    # Dynamic dimensions (symbolic batch size under tf.function).
    shape = ops.shape(x)
    n = ops.convert_to_tensor(1.0, "float32")
    for a in axes:
        n = n * ops.cast(shape[a], "float32")
    return n


def _blocked_sum(x, axes: Sequence[int], keepdims: bool):
    """Sum over `axes`, one axis at a time.

    Partial sums keep the rounding error of long float32 sums small on
    backends whose reductions accumulate sequentially (TensorFlow's CPU
    kernels): that error grows with the length of the sum, and a conv
    layer's channel holds tens of thousands of values.
    """
    first, *rest = sorted(axes, reverse=True)
    x = ops.sum(x, axis=first, keepdims=keepdims)
    for a in rest:  # all before `first`: unmoved by dropping it
        # The partial sums are pooled by a contraction, not by another
        # reduction: XLA (TensorFlow's) merges chained reductions into one
        # long sequential float32 sum again.
        size = x.shape[a] if x.shape[a] is not None else ops.shape(x)[a]
        ones = ops.ones((size,), x.dtype)
        x = ops.tensordot(x, ones, axes=([a], [0]))
        if keepdims:
            x = ops.expand_dims(x, a)
    return x


def shifted_moments(x, axes: Sequence[int], weights=None,
                    keepdims: bool = True):
    """Count, shift, mean offset and centered sum of squares of `x`.

    The corrected two-pass algorithm: a first mean `shift` (held constant
    for autodiff: every result below is exact for any constant shift), then
    the sums of deviations from it and of their squares, so that an
    inaccurate first mean (float32 summation of values with a large common
    offset) is corrected rather than squared into the variance. The mean is
    `shift + delta`; keeping the two apart lets callers form
    `(x - shift) - delta`, which is exact to float32 precision of the
    deviation even where `mean` itself cannot be represented that well.

    Args:
        x: Floating tensor (float32 or float64).
        axes: Axes to reduce over.
        weights: Optional 0/1 tensor broadcastable to `x`; zero entries are
            left out of the statistics.
        keepdims: Keep the reduced axes as size 1. `False` only where the
            remaining axes are the trailing ones (channels last), so that
            the statistics still broadcast against `x`.

    Returns:
        `(count, shift, delta, m2)`. Without weights and with every reduced
        dimension known, `count` is a Python float; otherwise a tensor like
        the others. A slice with no values has `count == 0` and zero
        statistics (so that gradients stay finite); `finite()` flags it.
    """
    axes = tuple(axes)
    present = None
    if weights is None:
        count = static_count(x, axes)
        if count is None:
            count = ops.cast(count_values(x, axes), x.dtype)
    else:
        weights = ops.broadcast_to(ops.cast(weights, x.dtype), ops.shape(x))
        count = ops.sum(weights, axis=axes, keepdims=keepdims)
        # Masked-out entries may hold NaN/Inf: select, never multiply them.
        present = weights > 0
        x = ops.where(present, x, ops.zeros_like(x))
    static = isinstance(count, float)
    safe = max(count, 1.0) if static else ops.maximum(count, 1.0)
    shift = ops.stop_gradient(_blocked_sum(x, axes, keepdims) / safe)
    d = x - shift
    if present is not None:
        d = ops.where(present, d, ops.zeros_like(d))
    s1 = _blocked_sum(d, axes, keepdims)
    s2 = _blocked_sum(ops.square(d), axes, keepdims)
    delta = s1 / safe
    # relu, not maximum(., 0.0): Keras's torch backend makes that float32.
    m2 = ops.relu(s2 - s1 * delta)
    if not static:
        count = ops.broadcast_to(count, ops.shape(shift))
    return count, shift, delta, m2


def moments(x, axes: Sequence[int], weights=None):
    """`(count, mean, m2)` of `x` over `axes`; see `shifted_moments`."""
    count, shift, delta, m2 = shifted_moments(x, axes, weights)
    if isinstance(count, float):
        count = ops.full_like(m2, count)
    return count, shift + delta, m2


def combine(counts, shifts, deltas, m2s, shift=0.0, axis: int = 0):
    """Pools groups' statistics stacked along `axis` (Chan et al.).

    Each group holds `count` values with mean `shifts + deltas` and centered
    sum of squares `m2s`. The pooled mean is returned as an offset from
    `shift` (a caller's own shift, so that it can keep centering in two
    exact steps), computed from the differences `shifts - shift`, which are
    small and exact where the groups are alike. Exact for any group sizes;
    empty groups carry weight 0.

    Returns:
        `(count, delta, m2)` of the pooled values, `axis` removed; the
        pooled mean is `shift + delta`.
    """
    count = ops.sum(counts, axis=axis, keepdims=True)
    present = counts > 0
    offsets = (shifts - shift) + deltas
    delta = ops.sum(
        ops.where(present, counts * offsets, 0.0), axis=axis, keepdims=True
    ) / ops.maximum(count, 1.0)
    spread = ops.where(
        present, m2s + counts * ops.square(offsets - delta), 0.0
    )
    m2 = ops.sum(spread, axis=axis, keepdims=True)
    return tuple(ops.squeeze(t, axis) for t in (count, delta, m2))


def finite(count, mean, variance, min_count: float = 1.0):
    """Per channel: True where the statistics can update moving averages:
    finite, from at least `min_count` values (counts are whole numbers, so
    the default 1 means "any"; the layer asks for 2, since one value has
    variance 0 by definition).

    `mean=None` checks the variance alone, enough wherever the variance is
    computed from deviations from the mean (`shifted_moments`, and every
    kernel here): a non-finite value or an overflowing sum reaches every
    deviation. A Python `count` is compared without an op.
    """
    ok = ops.isfinite(variance)
    if mean is not None:
        ok = ops.logical_and(ops.isfinite(mean), ok)
    if isinstance(count, float):
        return ok if count >= min_count else ops.zeros_like(ok)
    return ops.logical_and(count >= min_count, ok)

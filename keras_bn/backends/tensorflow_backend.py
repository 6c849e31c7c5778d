"""TensorFlow: replicas of `tf.distribute`, and the kernels.

Kernels: `xla` (under `jit_compile=True`), `exact_kernel` and `kernel`
(FusedBatchNormV3) in training, `kernel` in inference; `keras_bn.paths`
decides which runs. TensorFlow's CPU kernel sums in float32, so its mean is
off by a multiple of float32's rounding of |mean| on large batches (and
XLA's lowering forms E[x^2] - E[x]^2); that error reaches the variance and
the output relative to |mean| / std: the kernels shift where it dominates.
"""

import functools

import tensorflow as tf

from keras_bn import _compat
from keras_bn import moments
from keras_bn import paths
from keras_bn.backends import _shared

SEES_GLOBAL_BATCH = False


def num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def cross_replica(count, shift, delta, m2, group_size=None):
    """Pools statistics over the replicas of a `tf.distribute` strategy (or
    over this replica's group of `group_size`).

    One differentiable `all_gather` of the stacked statistics, groups
    included (each replica then pools its group's rows); per-replica
    batches may differ in size.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return count, delta, m2
    local = tf.stack([count, shift, delta, m2])[None]
    gathered = ctx.all_gather(local, axis=0)
    gathered = tf.reshape(gathered, [-1] + local.shape.as_list()[1:])
    gathered = _shared.replica_group(gathered, ctx.replica_id_in_sync_group,
                                     group_size)
    return moments.combine(*tf.unstack(gathered, num=4, axis=1), shift=shift)


@functools.cache
def _has_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _in_xla() -> bool:
    return not tf.executing_eagerly() and _compat.tf_in_xla_context()


def context() -> dict:
    return {"gpu": _has_gpu(), "xla": _in_xla()}


def _as_4d(x, axis: int):
    """`(x4, data_format)`: `x` as FusedBatchNormV3's 4-D input."""
    rank = x.shape.rank
    channels = x.shape[axis]
    if axis == rank - 1:
        return (x if rank == 4 else tf.reshape(x, (-1, 1, 1, channels))), "NHWC"
    outer = tf.reduce_prod(tf.shape(x)[:axis])
    return tf.reshape(x, tf.stack([outer, channels, -1, 1])), "NCHW"


def _fbn(x4, scale, offset, epsilon, data_format):
    """FusedBatchNormV3 in training mode (unbiased variance)."""
    empty = tf.constant([], tf.float32)
    return tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=epsilon, exponential_avg_factor=1.0,
        data_format=data_format, is_training=True,
    )


def _scale_offset(gamma, beta, channels):
    """Float32 scale and offset for the kernels (ones, zeros if None)."""
    # convert_to_tensor reads a variable: custom gradients take tensors.
    ones = tf.ones((channels,), tf.float32)
    return (ones if gamma is None else tf.convert_to_tensor(gamma),
            ones * 0.0 if beta is None else tf.convert_to_tensor(beta))


def _fbn_grad(dy, x4, scale, r1, r2, r3, epsilon, data_format, dtype):
    """FusedBatchNormGradV3 in training mode: `(dx, dscale, doffset)`,
    dx in `dtype` (the layer input's: `x4` may be a float32 shifted copy)."""
    dx, dscale, doffset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=x4, scale=scale, reserve_space_1=r1,
        reserve_space_2=r2, reserve_space_3=r3, epsilon=epsilon,
        data_format=data_format, is_training=True,
    )[:3]
    return tf.cast(dx, dtype), dscale, doffset


def _kernel_m2(variance, n):
    """Sum of squared deviations from the kernel's `batch_variance` over
    `n` values: it reports the unbiased variance, with n - 1 floored at 1."""
    return variance * tf.maximum(n - 1.0, 1.0)


# The exact path's statistics: FusedBatchNormV3 sums each channel
# sequentially in float32, whose error grows with the number of rows, so
# longer batches are cut into groups of at most this many rows (short
# enough for 1e-5 of float64), pooled with Chan's formula. More rows per
# group means fewer, wider groups, and the kernel slows down when it sees
# thousands of channels.
_GROUP_ROWS = 4096


def _split_rows(x2d, rows_per_group):
    """`(head, tail, length)`: `[rows, channels]` data cut into groups.

    Row `l * groups + g` of the leading `length * groups` rows goes to group
    `g`, so that `head`, viewed as `[length, groups * channels]`, holds one
    group per column block without a transpose; the fewer than `groups`
    rows left over, `tail`, form one more group.
    """
    channels = x2d.shape[-1]
    rows = tf.shape(x2d, out_type=tf.int64)[0]
    groups = tf.maximum((rows + rows_per_group - 1) // rows_per_group, 1)
    length = rows // groups
    head = tf.reshape(x2d[: length * groups],
                      tf.stack([length, groups * channels]))
    return head, x2d[length * groups:], length


def _pool_groups(length, shifts, deltas, m2s, tail):
    """Chan-pools `[groups, channels]` statistics of `length` rows each
    (means `shifts + deltas`) with those of `tail`; returns
    `(count, center, delta, m2)`, the mean being `center + delta`."""
    n = tf.cast(length, tf.float32)
    count, shift, delta, m2 = moments.shifted_moments(
        tf.cast(tail, tf.float32), (0,))
    if isinstance(count, float):  # a tail whose length is known
        count = tf.fill(tf.shape(shift), count)
    counts = tf.concat([tf.fill(tf.shape(shifts), n), count], 0)
    shifts = tf.concat([shifts, shift], 0)
    deltas = tf.concat([deltas, delta], 0)
    m2s = tf.concat([m2s, m2], 0)
    # Pooled relative to the first group's mean: small, exact offsets.
    center = shifts[0]
    total, delta, m2 = moments.combine(counts, shifts, deltas, m2s,
                                          shift=center)
    return total, center, delta, m2


def _group_moments(x2d, rows_per_group):
    """Per-channel `(count, center, delta, m2)` of `[rows, channels]` data
    from one FusedBatchNormV3 call over the groups of `_split_rows`."""
    channels = x2d.shape[-1]
    head, tail, length = _split_rows(x2d, rows_per_group)
    width = tf.shape(head, out_type=tf.int64)[1]
    ones = tf.ones(tf.reshape(width, [1]), tf.float32)
    # Only the statistics are used (epsilon only enters the output).
    out = _fbn(tf.reshape(head, tf.stack([length, 1, 1, width])), ones,
               ones * 0.0, 1e-3, "NHWC")
    means = tf.reshape(out.batch_mean, [-1, channels])
    m2s = tf.reshape(
        _kernel_m2(out.batch_variance, tf.cast(length, tf.float32)),
        [-1, channels])
    return _pool_groups(length, means, tf.zeros_like(means), m2s, tail)


def _xla_group_sums(x2d, rows_per_group):
    """Exact per-channel sums of `[rows, channels]` data under XLA.

    The groups' partial sums are pooled with a matmul: XLA merges
    consecutive reductions into one, whose float32 sum runs sequentially
    over the whole batch again.
    """
    channels = x2d.shape[-1]
    head, tail, _ = _split_rows(x2d, rows_per_group)
    partial = tf.reshape(tf.reduce_sum(head, 0), [-1, channels])
    ones = tf.ones(tf.stack([1, tf.shape(partial)[0]]), partial.dtype)
    return tf.matmul(ones, partial)[0] + tf.reduce_sum(tail, 0)


def _xla_train(x, gamma, beta, epsilon, axis):
    """Channels-last training step under XLA, exact: grouped sums (the
    corrected two-pass algorithm per group), Chan pooling, and the paper's
    backward with grouped sums; XLA fuses the elementwise work."""
    channels = x.shape[-1]
    scale, offset = _scale_offset(gamma, beta, channels)

    @tf.custom_gradient
    def run(x, scale, offset):
        xf = tf.reshape(tf.cast(x, tf.float32), (-1, channels))
        head, tail, length = _split_rows(xf, _GROUP_ROWS)
        n = tf.cast(length, tf.float32)
        first = tf.reduce_sum(head, 0) / tf.maximum(n, 1.0)
        dev = head - first
        # Deviations from a first mean, corrected by their own mean.
        s1 = tf.reduce_sum(dev, 0)
        s2 = tf.reduce_sum(tf.square(dev), 0)
        delta = s1 / tf.maximum(n, 1.0)
        m2s = tf.maximum(s2 - s1 * delta, 0.0)
        # Means kept as first + delta: one float32 would lose the low bits
        # of a mean far from zero.
        count, center, delta, m2 = _pool_groups(
            length, *(tf.reshape(t, (-1, channels)) for t in
                      (first, delta, m2s)), tail)
        var = m2 / tf.maximum(count, 1.0)
        inv = tf.math.rsqrt(var + epsilon)
        y = ((xf - center) - delta) * (inv * scale) + offset

        def grad(dy, dmean, dvar):
            # mean and variance only feed the moving averages.
            del dmean, dvar
            g = tf.reshape(tf.cast(dy, tf.float32), (-1, channels))
            centered = (xf - center) - delta
            sum_dy = _xla_group_sums(g, _GROUP_ROWS)
            sum_dy_xhat = _xla_group_sums(g * (centered * inv), _GROUP_ROWS)
            dx = _shared.input_gradient(g, centered, scale, inv, sum_dy,
                                        sum_dy_xhat, tf.maximum(count, 1.0))
            return (tf.cast(tf.reshape(dx, tf.shape(x)), x.dtype),
                    sum_dy_xhat, sum_dy)

        y = tf.cast(tf.reshape(y, tf.shape(x)), x.dtype)
        return (y, center + delta, var), grad

    y, mean, var = run(x, scale, offset)
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)


# Rows per group of the exact path's statistics on CPU (`_exact_train`).
# Its backward takes d gamma = sum(dy * xhat) from FusedBatchNormGradV3,
# and an error in the mean shifts every xhat alike, an error that sum(dy)
# multiplies (by thousands where dy has a mean of its own): groups this
# short keep the mean within a rounding or two. Shorter groups are wider
# (more channels) for the kernel, which costs time.
_KERNEL_GROUP_ROWS = 256


def _small_train(x, gamma, beta, epsilon, axis):
    """Channels-last training step in plain TensorFlow ops, for inputs
    below `paths.TF_MIN_KERNEL_SIZE_CPU` values (`_exact_train`).

    The statistics are the reference path's own (`moments.shifted_moments`,
    the same ops, so the same float32 results), and so is the output's
    formula (`BatchNormalization._normalize`): the mean `shift + delta`
    kept in two parts, `(x - shift) * a + (beta - delta * a)` with
    `a = gamma / sqrt(var + eps)`. The backward is the paper's
    (`_shared.input_gradient`) with the sums autodiff would take
    (`reduce_sum` over the same axes), in a dozen ops instead of the
    autodiff graph of the corrected two-pass moments: float32 roundings of
    terms the size of dx's own, as on the `xla` path, with no cancellation
    (checked against float64 at means up to 1e5 std,
    tests/test_tf_unknown_batch.py).
    """
    channels = x.shape[-1]
    axes = tuple(range(x.shape.rank - 1))
    scale, offset = _scale_offset(gamma, beta, channels)

    @tf.custom_gradient
    def run(x, scale, offset):
        xf = x if x.dtype == tf.float32 else tf.cast(x, tf.float32)
        _, shift, delta, m2 = moments.shifted_moments(xf, axes,
                                                      keepdims=False)
        # The count's ops as in shifted_moments (Grappler merges them), not
        # its per-channel copy.
        n = tf.maximum(moments.count_values(xf, axes), 1.0)
        var = m2 / n
        inv = tf.math.rsqrt(var + epsilon)
        a = inv * scale
        d = xf - shift  # the same op as in shifted_moments (Grappler CSE)
        y = d * a + (offset - delta * a)

        def grad(dy, dmean, dvar):
            # mean and variance only feed the moving averages.
            del dmean, dvar
            g = dy if dy.dtype == tf.float32 else tf.cast(dy, tf.float32)
            centered = d - delta
            sum_dy = tf.reduce_sum(g, axes)
            sum_dy_xhat = tf.reduce_sum(g * centered, axes) * inv
            dx = _shared.input_gradient(g, centered, scale, inv, sum_dy,
                                        sum_dy_xhat, n)
            return tf.cast(dx, x.dtype), sum_dy_xhat, sum_dy

        return (tf.cast(y, x.dtype), shift + delta, var), grad

    y, mean, var = run(x, scale, offset)
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)


def _exact_train(x, gamma, beta, epsilon, axis):
    """The exact path's training step: `_kernel_exact_train`, except where
    `paths.tf_small` holds: an input below the kernel's size floor, or
    (`model.fit` traces for any batch) a sample so small that a batch of
    `paths.TF_UNKNOWN_BATCH_ROWS` would be, where `_small_train` runs
    instead. Decided once per input signature, when traced: no `tf.cond`."""
    if paths.tf_small(tuple(x.shape)):
        return _small_train(x, gamma, beta, epsilon, axis)
    return _kernel_exact_train(x, gamma, beta, epsilon, axis)


def _kernel_exact_train(x, gamma, beta, epsilon, axis):
    """Channels-last training step with exact statistics (CPU kernels).

    Forward: up to `_KERNEL_GROUP_ROWS` rows, FusedBatchNormV3 as it is
    (its sums are short); beyond, grouped statistics (`_group_moments`),
    then the output in one FusedBatchNormV3 inference pass with them.
    Backward: FusedBatchNormGradV3 with those statistics as its reserve
    spaces (the CPU kernel's mean and biased variance); its own float32
    sums of `dy` and `dy * xhat` enter dx divided by the batch size, where
    their rounding no longer shows, and are d beta and d gamma.
    """
    channels = x.shape[-1]
    x4 = tf.reshape(x, (-1, 1, 1, channels))
    scale, offset = _scale_offset(gamma, beta, channels)
    empty = tf.constant([], tf.float32)

    def whole(x4):
        out = _fbn(x4, scale, offset, epsilon, "NHWC")
        n = tf.cast(tf.shape(x4, out_type=tf.int64)[0], tf.float32)
        var = _kernel_m2(out.batch_variance, n) / tf.maximum(n, 1.0)
        return out.y, out.batch_mean, var

    def grouped(x4):
        count, center, delta, m2 = _group_moments(
            tf.reshape(x4, (-1, channels)), _KERNEL_GROUP_ROWS)
        mean = center + delta
        var = m2 / tf.maximum(count, 1.0)
        y = tf.raw_ops.FusedBatchNormV3(
            x=x4, scale=scale, offset=offset, mean=mean, variance=var,
            epsilon=epsilon, data_format="NHWC", is_training=False).y
        return y, mean, var

    def forward(x4):
        rows = x4.shape[0]
        if rows is not None:
            return (whole if rows <= _KERNEL_GROUP_ROWS else grouped)(x4)
        return tf.cond(tf.shape(x4)[0] <= _KERNEL_GROUP_ROWS,
                       lambda: whole(x4), lambda: grouped(x4))

    @tf.custom_gradient
    def run(x4, scale, offset):
        y, mean, var = forward(x4)
        # Far from zero (|mean| > 8 std) float32 sums of x lose the variance
        # and x - mean the deviations' bits: normalize x - mean instead, in
        # float32 (batch norm is shift invariant). NaN compares False.
        bad = tf.reduce_any(_shared.mean_dominates(mean, var))
        shift = tf.stop_gradient(mean)

        def shifted_input():
            return tf.cast(x4, tf.float32) - shift

        def shifted():
            y_s, delta, var_s = forward(shifted_input())
            return tf.cast(y_s, x4.dtype), shift + delta, var_s, delta

        y, mean, var, center = tf.cond(
            bad, shifted, lambda: (y, mean, var, mean))

        def grad(dy, dmean, dvar):
            # mean and variance only feed the moving averages.
            del dmean, dvar

            def backward(xk, dyk):
                return _fbn_grad(dyk, xk, scale, center, var, empty, epsilon,
                                 "NHWC", x4.dtype)

            return tf.cond(
                bad,
                lambda: backward(shifted_input(), tf.cast(dy, tf.float32)),
                lambda: backward(x4, dy))

        return (y, mean, var), grad

    y, mean, var = run(x4, scale, offset)
    return (tf.reshape(y, tf.shape(x)), tf.stop_gradient(mean),
            tf.stop_gradient(var))


def _kernel_train(x, gamma, beta, epsilon, axis):
    """FusedBatchNormV3 as it is (fused=True), shifted where |mean| >> std;
    under XLA always shifted (XLA fuses the shift into the kernel's
    passes)."""
    x4, fmt = _as_4d(x, axis)
    bshape = [1, -1, 1, 1] if fmt == "NCHW" else [1, 1, 1, -1]
    dims = [0, 2, 3] if fmt == "NCHW" else [0, 1, 2]
    always_shift = _in_xla()
    scale, offset = _scale_offset(gamma, beta, x.shape[axis])

    def shifted_input(x4, shift):
        # In float32: exact for the values within a factor 2 of the shift,
        # and rounded to float32 (not to the input's half precision) else.
        return tf.cast(x4, tf.float32) - tf.reshape(shift, bshape)

    def plain(x4):
        out = _fbn(x4, scale, offset, epsilon, fmt)
        return (out.y, out.batch_mean, out.batch_variance,
                out.reserve_space_1, out.reserve_space_2,
                out.reserve_space_3, tf.zeros_like(out.batch_mean))

    def shifted(x4):
        rows = _shared.leading_rows(tf.shape(x4)[0])
        shift = tf.reduce_mean(tf.cast(x4[:rows], tf.float32), axis=dims)
        out = _fbn(shifted_input(x4, shift), scale, offset, epsilon, fmt)
        return (tf.cast(out.y, x4.dtype), out.batch_mean + shift,
                out.batch_variance, out.reserve_space_1,
                out.reserve_space_2, out.reserve_space_3, shift)

    @tf.custom_gradient
    def run(x4, scale, offset):
        if always_shift:
            # XLA fuses the shift (and any cast) into the kernel's passes.
            bad = tf.constant(True)
            y, mean, var, r1, r2, r3, shift = shifted(x4)
        else:
            result = plain(x4)
            # NaN statistics compare False: they go to the finite guard.
            bad = tf.reduce_any(_shared.mean_dominates(result[1], result[2]))
            y, mean, var, r1, r2, r3, shift = tf.cond(
                bad, lambda: shifted(x4), lambda: result)

        def grad(dy, dmean, dvar):
            # mean and variance only feed the moving averages (their
            # gradients are not used), so only dy flows back.
            del dmean, dvar

            def backward(xk, dyk):
                return _fbn_grad(dyk, xk, scale, r1, r2, r3, epsilon, fmt,
                                 x4.dtype)

            def shifted_backward():
                # Recomputes the shifted input instead of keeping it alive.
                return backward(shifted_input(x4, shift),
                                tf.cast(dy, tf.float32))

            if always_shift:
                return shifted_backward()
            return tf.cond(bad, shifted_backward, lambda: backward(x4, dy))

        return (y, mean, var), grad

    y, mean, var = run(x4, scale, offset)
    n = tf.cast(tf.size(x4, out_type=tf.int64), tf.float32) / float(
        x.shape[axis])
    var = _kernel_m2(var, n) / tf.maximum(n, 1.0)
    y = tf.reshape(y, tf.shape(x))
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)


def _kernel_infer(x, mean, variance, gamma, beta, epsilon, axis):
    x4, fmt = _as_4d(x, axis)
    scale, offset = _scale_offset(gamma, beta, x.shape[axis])
    y = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=scale, offset=offset,
        mean=tf.cast(mean, tf.float32), variance=tf.cast(variance, tf.float32),
        epsilon=epsilon, data_format=fmt, is_training=False,
    ).y
    return tf.reshape(y, tf.shape(x))


TRAIN = {paths.XLA: _xla_train, paths.EXACT_KERNEL: _exact_train,
         paths.KERNEL: _kernel_train}
INFER = {paths.KERNEL: _kernel_infer}


def _read_once(variable):
    # One ReadVariableOp, then an Identity: the graph then reads the
    # variable once, not once per use of its value.
    return tf.identity(tf.convert_to_tensor(variable))


def assign_moving_average(variable, value, momentum: float, ok):
    """`_shared.assign_moving_average`, the variable read once."""
    return _shared.assign_moving_average(variable, value, momentum, ok,
                                         read=_read_once)

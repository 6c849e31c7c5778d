"""PyTorch: ranks of `torch.distributed`, and the kernels.

Kernels: `exact_kernel` and `kernel` (ATen's batch norm) in training,
`kernel` in inference; `keras_bn.paths` decides which runs. ATen's
channels-last kernels (NHWC data, and 2-D inputs) sum each channel
sequentially in float32: on a conv layer's activations the variance and dx
drift far past 1e-5 of float64. The exact kernel therefore feeds them
groups of rows (`keras_bn.paths.row_groups`: a free reshape into more
"channels"), pools the groups' statistics exactly (Chan et al.) and forms
dx from the pooled sums with two elementwise passes. ATen's contiguous
(channels-first) kernels reduce accurately and are used as they are.
"""

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from keras_bn import _compat
from keras_bn import moments
from keras_bn.backends import _shared
from keras_bn import paths

SEES_GLOBAL_BATCH = False
# Values per chunk of a CPU dx (see _rows_dx): 4 MiB of float32.
_CHUNK = 1 << 20


def num_replicas() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def context() -> dict:
    return {"compiling": torch.compiler.is_compiling()}


class _AllGather(torch.autograd.Function):
    """Stacks every rank's tensor; the backward sums each rank's gradients
    for this rank's slot (all-reduce, which gloo supports)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def cross_replica(count, shift, delta, m2, group_size=None):
    """Pools statistics over the ranks of `torch.distributed` (any backend,
    gloo included), or over this rank's group of `group_size` consecutive
    ranks: one all-gather either way, each rank then pooling its group's
    rows (no process groups to create); per-rank batches may differ in
    size."""
    if num_replicas() == 1:
        return count, delta, m2
    gathered = _AllGather.apply(torch.stack([count, shift, delta, m2]))
    gathered = _shared.replica_group(gathered, dist.get_rank(), group_size)
    return moments.combine(*torch.unbind(gathered, dim=1), shift=shift)


def _channels_view(x, axis: int):
    """`(view, restore)`: `x` seen as `(N, C, ...)` for ATen, without copy.

    NHWC / NDHWC storage becomes an NCHW / NCDHW view in channels_last
    format, which ATen's channels_last kernels read in place.
    """
    rank = x.dim()
    if axis == rank - 1 and rank in (4, 5):
        perm = (0, rank - 1, *range(1, rank - 1))
        inverse = (0, *range(2, rank), 1)
        return x.permute(perm), lambda y: y.permute(inverse)
    shape = tuple(x.shape)
    if axis == rank - 1:
        return x.reshape(-1, shape[axis]), lambda y: y.reshape(shape)
    outer = 1
    for d in shape[:axis]:
        outer *= d
    return x.reshape(outer, shape[axis], -1), lambda y: y.reshape(shape)


def _per_channel(v, view):
    return v.reshape((1, -1) + (1,) * (view.dim() - 2))


def _mean_dominates(mean, variance, epsilon: float = 0.0) -> bool:
    """Whether `_shared.mean_dominates` holds for some channel (one host
    sync)."""
    return bool(_shared.mean_dominates(mean, variance, epsilon).any())


# id(moving mean) -> (its weakref, variance weakref, (versions, epsilon),
# _mean_dominates): the moving statistics change only in place (a training
# step's assign bumps torch's version counter), so inference checks them
# once per change instead of with a host sync on every call.
_CHECKED = {}


def _moving_mean_dominates(mean, variance, epsilon: float) -> bool:
    """`_mean_dominates` of moving statistics, remembered while unchanged."""
    try:
        state = (_compat.torch_version(mean), _compat.torch_version(variance),
                 epsilon)
    except RuntimeError:  # inference-mode tensors keep no version
        state = None
    if state is None or torch.compiler.is_compiling():
        return _mean_dominates(mean, variance, epsilon)
    key = id(mean)
    entry = _CHECKED.get(key)
    if (entry is not None and entry[0]() is mean and entry[1]() is variance
            and entry[2] == state):
        return entry[3]
    result = _mean_dominates(mean, variance, epsilon)
    _CHECKED[key] = (weakref.ref(mean, lambda _: _CHECKED.pop(key, None)),
                     weakref.ref(variance), state, result)
    return result


def _leading_mean(view):
    """Per-channel mean of the leading 1/64 of `view` (channels on dim 1)."""
    rows = _shared.leading_rows(view.shape[0])
    dims = [d for d in range(view.dim()) if d != 1]
    return view[:rows].detach().float().mean(dim=dims)


def _batch_norm_train(view, gamma, beta, epsilon):
    """ATen's training batch norm; `(y, mean, unbiased variance)`."""
    # momentum=1 makes the running buffers the batch statistics themselves
    # (float32 at least: ATen keeps half-precision statistics in float32).
    dtype = torch.promote_types(view.dtype, torch.float32)
    mean = torch.zeros(view.shape[1], dtype=dtype, device=view.device)
    var = torch.zeros_like(mean)
    y = F.batch_norm(view, mean, var, gamma, beta, True, 1.0, epsilon)
    return y, mean, var


def _grouped_moments(rows, groups):
    """Exact per-column mean and biased variance of `rows` (n, C)."""
    n, c = rows.shape
    blocks = rows.reshape(n // groups, groups * c)
    # Float32 running buffers select ATen's mixed-type kernel, which reads
    # half-precision rows as they are and returns float32 statistics (its
    # sums are float32 for every input dtype).
    running = (None, None)
    if rows.dtype != torch.float32:
        running = torch.zeros(2, groups * c, device=rows.device).unbind()
    mean, var = _compat.torch_batch_norm_update_stats(blocks, *running, 1.0)
    mean, var = mean.reshape(groups, c), var.reshape(groups, c)
    pooled = mean.mean(0)
    return pooled, (var + (mean - pooled) ** 2).mean(0)


def _rows_dx(dy, rows, scale, k, const):
    """`const + scale * dy - k * rows` (n, C) in float32, in `dy`'s dtype.

    On CPU in chunks of about _CHUNK values, so that the second pass reads
    the first one's result from cache; half precision goes through one
    reused float32 buffer (addcmul converts each half-precision chunk to
    float32 on its way in) and is rounded once, as the reference path
    rounds its float32 gradient. Full-size float32 temporaries would be
    fresh, page-faulting allocations and extra trips through memory.
    """
    n, c = dy.shape
    step = n if dy.device.type != "cpu" else max(1, _CHUNK // max(c, 1))
    dx = torch.empty((n, c), dtype=dy.dtype, device=dy.device)
    buffer = None
    if dy.dtype != torch.float32:
        buffer = torch.empty((min(step, n), c), device=dy.device)
    for start in range(0, n, step):
        part = slice(start, start + step)
        d = dx[part] if buffer is None else buffer[:min(step, n - start)]
        torch.addcmul(const, dy[part], scale, out=d)
        d.addcmul_(rows[part], k, value=-1.0)
        if buffer is not None:
            dx[part].copy_(d)
    return dx


class _RowsBatchNorm(torch.autograd.Function):
    """Batch norm of `rows` (n, C) over n, with short float32 sums.

    Half-precision rows are read as they are (ATen's mixed-type kernels
    compute in float32): the output and dx are rounded once.
    """

    @staticmethod
    def forward(ctx, rows, gamma, beta, epsilon, groups):
        mean, var = _grouped_moments(rows, groups)
        y = F.batch_norm(rows, mean, var, gamma, beta, False, 0.0, epsilon)
        ctx.save_for_backward(rows, gamma, mean, torch.rsqrt(var + epsilon))
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, dmean, dvar):
        # mean and variance only feed the moving averages.
        del dmean, dvar
        rows, gamma, mean, inv = ctx.saved_tensors
        n, c = rows.shape
        groups = ctx.groups
        # Per group: sum(dy) and sum(dy * (x - mean)), mean = the channel's
        # (save_invstd = 1); then summed over the groups.
        _, sum_dyx, sum_dy = _compat.torch_native_batch_norm_backward(
            dy.reshape(n // groups, groups * c),
            rows.reshape(n // groups, groups * c),
            None, None, None, mean.repeat(groups),
            inv.new_ones(groups * c), True, 0.0,
            [False, True, True],
        )
        sum_dy_xhat = sum_dyx.reshape(groups, c).sum(0) * inv
        sum_dy = sum_dy.reshape(groups, c).sum(0)
        a, k, b = _shared.gradient_coefficients(
            1.0 if gamma is None else gamma, inv, sum_dy, sum_dy_xhat, n)
        dx = _rows_dx(dy, rows, a, k, k * mean - b)
        dgamma = sum_dy_xhat if ctx.needs_input_grad[1] else None
        dbeta = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dgamma, dbeta, None, None


def _exact_train(x, gamma, beta, epsilon, axis):
    """Channels-last `(y, mean, variance)` on `paths.row_groups` groups."""
    rows = x.reshape(-1, x.shape[axis])
    groups = paths.row_groups(rows.shape[0])
    y, mean, var = _RowsBatchNorm.apply(rows, gamma, beta, epsilon, groups)
    if _mean_dominates(mean, var):
        shift = _leading_mean(rows)
        # In float32, as the reference path subtracts it (rare: a
        # half-precision batch then takes a float32 copy).
        y, mean, var = _RowsBatchNorm.apply(rows.float() - shift, gamma, beta,
                                            epsilon, groups)
        y, mean = y.to(rows.dtype), mean + shift
    return y.reshape(x.shape), mean, var


def _kernel_train(x, gamma, beta, epsilon, axis):
    """ATen's kernel as it is, shifted where |mean| >> std."""
    view, restore = _channels_view(x, axis)
    n = x.numel() // x.shape[axis]
    y, mean, var = _batch_norm_train(view, gamma, beta, epsilon)
    # NaN statistics compare False: they go to the layer's finite guard.
    if _mean_dominates(mean, var):
        shift = _leading_mean(view)
        # In float32: exact for the values within a factor 2 of the shift,
        # and rounded to float32 (not to a half-precision input's) else.
        shifted = view.float() - _per_channel(shift, view)
        y, mean, var = _batch_norm_train(shifted, gamma, beta, epsilon)
        y, mean = y.to(view.dtype), mean + shift
    # ATen keeps the unbiased variance; the layer's is the biased one.
    return restore(y), mean, var * ((n - 1) / n)


def _kernel_infer(x, mean, variance, gamma, beta, epsilon, axis):
    """ATen's inference kernel, or None while the moving mean dominates:
    ATen computes x * a + (beta - mean * a), whose two terms then cancel
    and lose the output's low bits."""
    if _moving_mean_dominates(mean, variance, epsilon):
        return None
    view, restore = _channels_view(x, axis)
    y = F.batch_norm(view, mean, variance, gamma, beta, False, 0.0, epsilon)
    return restore(y)


def assign_moving_average(variable, value, momentum: float, ok):
    """`Backend.assign_moving_average` in torch's own ops, in place: eager
    PyTorch runs the layer op by op, and each `keras.ops` call and
    `Variable.assign` costs more than its kernel on per-channel vectors.
    Same formula as `_shared.moving_average`, so the same rounding; no
    autograd graph. Falls back to `variable.assign` wherever that does more
    than write the storage: in a `StatelessScope` (which collects the
    update), under torch.compile, across dtypes or devices."""
    target = _compat.variable_storage(variable)
    if (_compat.in_stateless_scope() or torch.compiler.is_compiling()
            or target.dtype != value.dtype or target.device != value.device):
        return _shared.assign_moving_average(variable, value, momentum, ok)
    with torch.no_grad():
        new = target * momentum + value * (1.0 - momentum)
        if ok is not None:
            new = torch.where(ok, new, target)
        target.copy_(new)
    return new


TRAIN = {paths.EXACT_KERNEL: _exact_train, paths.KERNEL: _kernel_train}
INFER = {paths.KERNEL: _kernel_infer}

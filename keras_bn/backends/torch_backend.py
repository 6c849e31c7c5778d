"""torch specifics: cross-replica statistics and fused kernels."""


def num_replicas() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather():
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        """Stacks every rank's tensor; the backward sums each rank's
        gradients for this rank's slot (all-reduce, which gloo supports)."""

        @staticmethod
        def forward(ctx, tensor):
            tensor = tensor.contiguous()
            parts = [torch.empty_like(tensor)
                     for _ in range(dist.get_world_size())]
            dist.all_gather(parts, tensor)
            return torch.stack(parts)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad[dist.get_rank()]

    return AllGather


def cross_replica(count, shift, delta, m2):
    """Pools statistics over the ranks of `torch.distributed` (any backend,
    gloo included); per-rank batches may differ in size."""
    import torch

    from keras_bn import statistics

    if num_replicas() == 1:
        return count, delta, m2
    gathered = _all_gather().apply(torch.stack([count, shift, delta, m2]))
    return statistics.combine(*torch.unbind(gathered, dim=1), shift=shift)


# ------------------------------------------------------------ fused kernels
#
# ATen's batch norm sums in float32, so its mean is off by about 1e-5 of
# |mean| on large batches; that error reaches the variance (and the output)
# relative to |mean| / std. Where that ratio exceeds _MAX_MEAN_TO_STD the
# batch is normalized again after subtracting a constant per-channel shift,
# which is exact (batch norm is shift invariant) and brings the ratio down.
_MAX_MEAN_TO_STD = 8.0
# The shift is the mean of the leading 1/64 of the batch: any subset holding
# a fraction f of the values has (mean_subset - mean)^2 <= var * (1 - f) / f,
# so the shifted data has |mean| / std <= 8 whatever the input.
_SHIFT_FRACTION = 64


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


def _batch_norm_train(view, gamma, beta, epsilon):
    """ATen's training batch norm; `(y, mean, unbiased variance)`."""
    import torch
    import torch.nn.functional as F

    # momentum=1 makes the running buffers the batch statistics themselves
    # (float32 at least: ATen keeps half-precision statistics in float32).
    dtype = torch.promote_types(view.dtype, torch.float32)
    mean = torch.zeros(view.shape[1], dtype=dtype, device=view.device)
    var = torch.zeros_like(mean)
    y = F.batch_norm(view, mean, var, gamma, beta, True, 1.0, epsilon)
    return y, mean, var


def fused_train(x, gamma, beta, epsilon, axis):
    import torch

    if not x.dtype.is_floating_point or x.dim() < 2:
        return None
    channels = x.shape[axis]
    n = x.numel() // channels if channels else 0
    if n < 2:  # ATen refuses single values; the Bessel factor needs n > 1.
        return None
    view, restore = _channels_view(x, axis)
    y, mean, var = _batch_norm_train(view, gamma, beta, epsilon)
    # NaN statistics compare False: they go to the layer's finite guard.
    if bool((mean * mean > _MAX_MEAN_TO_STD**2 * var).any()):
        rows = -(-view.shape[0] // _SHIFT_FRACTION)
        dims = [d for d in range(view.dim()) if d != 1]
        shift = view[:rows].detach().float().mean(dim=dims)
        # In float32: exact for the values within a factor 2 of the shift,
        # and rounded to float32 (not to a half-precision input's) else.
        shifted = view.float() - _per_channel(shift, view)
        y, mean, var = _batch_norm_train(shifted, gamma, beta, epsilon)
        y, mean = y.to(view.dtype), mean + shift
    # ATen keeps the unbiased variance; the layer's is the biased one.
    return restore(y), mean, var * ((n - 1) / n)


def fused_infer(x, mean, variance, gamma, beta, epsilon, axis):
    import torch
    import torch.nn.functional as F

    if not x.dtype.is_floating_point or x.dim() < 2:
        return None
    # ATen computes x * a + (beta - mean * a): where |mean| / std is large
    # the two terms cancel and lose the output's low bits, so decline.
    std = torch.sqrt(variance + epsilon)
    if bool((mean.abs() > _MAX_MEAN_TO_STD * std).any()):
        return None
    view, restore = _channels_view(x, axis)
    y = F.batch_norm(view, mean, variance, gamma, beta, False, 0.0, epsilon)
    return restore(y)

"""`sync_moving_statistics`: one set of moving statistics across ranks."""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_bn import _compat
from keras_bn import _validation as check


def _torch_world() -> int:
    """World size of an initialized `torch.distributed` (1 if none)."""
    if keras.backend.backend() != "torch":
        return 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sync_moving_statistics(model: keras.layers.Layer) -> int:
    """Makes every rank's batch-norm moving statistics the same, pooled.

    With `synchronized=False` under `torch.distributed`, each rank keeps its
    own moving statistics, so checkpoints and evaluations depend on which
    rank wrote them. This all-gathers the moving statistics of every
    batch-norm layer of `model` (ours and `keras.layers.BatchNormalization`,
    nested models included) and sets, on every rank, the mean to the mean
    of the ranks' means and the variance to the mean of their variances
    plus the variance of their means (the pooled variance of equally sized
    ranks). A Batch Renormalization layer's `moving_stddev` follows, as
    `sqrt(variance + epsilon)`; its `renorm_mean` and `renorm_stddev` stay
    each rank's. Call it on every rank (it is a collective), for example
    before saving a checkpoint or evaluating.

    Elsewhere it changes nothing and returns 0: in one process, and under
    `tf.distribute` and `keras.distribution`, where the moving statistics
    already exist once (TensorFlow mirrors ours with `aggregation="mean"`;
    a JAX step is one program over the global batch).

    Args:
        model: A Keras model or layer.

    Returns:
        The number of layers synchronized.
    """
    check.keras_layer("model", model)
    world = _torch_world()
    if world == 1:
        return 0
    import torch
    import torch.distributed as dist

    from keras_bn.layers import BatchNormalization

    layers = [layer for layer in _compat.flatten_layers(model)
              if isinstance(layer, (BatchNormalization,
                                    keras.layers.BatchNormalization))
              and layer.built]
    if not layers:
        return 0
    # One collective for every layer: the concatenated means and variances.
    local = torch.cat([
        torch.as_tensor(keras.ops.convert_to_numpy(v), dtype=torch.float64)
        .reshape(-1)
        for layer in layers
        for v in (layer.moving_mean, layer.moving_variance)])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    stacked = torch.stack(parts).numpy()  # (world, values), float64
    offset = 0
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        size = math.prod(shape)
        means = stacked[:, offset:offset + size]
        variances = stacked[:, offset + size:offset + 2 * size]
        offset += 2 * size
        mean = means.mean(0)
        variance = variances.mean(0) + ((means - mean) ** 2).mean(0)
        layer.moving_mean.assign(mean.reshape(shape).astype(
            layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.reshape(shape).astype(
            layer.moving_variance.dtype))
        if getattr(layer, "renorm", False) and getattr(
                layer, "moving_stddev", None) is not None:
            layer.moving_stddev.assign(np.sqrt(
                variance + layer.epsilon).reshape(shape).astype(
                    layer.moving_stddev.dtype))
    return len(layers)

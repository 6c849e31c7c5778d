"""Helpers for tests on whole models: their batch-norm layers, found
through the public `layers` of each (nested) model, and non-trivial
weights for them."""

from __future__ import annotations

import keras
import numpy as np

import keras_bn

BN_CLASSES = (keras.layers.BatchNormalization, keras_bn.BatchNormalization)


def layer_paths(model, prefix=""):
    """`(path, layer)` of every layer, e.g. `("inner/bn", layer)`."""
    for layer in model.layers:
        yield prefix + layer.name, layer
        if isinstance(layer, keras.Model):
            yield from layer_paths(layer, f"{prefix}{layer.name}/")


def all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included."""
    return [layer for _, layer in layer_paths(model)]


# Ranges of each batch-norm weight: far from the initial values (0, 1, 1,
# 0), variances and standard deviations well away from 0.
_RANGES = {
    "moving_mean": (-1.0, 1.0),
    "moving_variance": (0.3, 3.0),
    "gamma": (0.5, 1.5),
    "beta": (-0.5, 0.5),
    "moving_stddev": (0.5, 1.7),
    "renorm_mean": (-1.0, 1.0),
    "renorm_stddev": (0.5, 1.7),
}
_RENORM = ("moving_stddev", "renorm_mean", "renorm_stddev")


def randomize_bn(layer_or_model, rng=0):
    """Random weights for a batch-norm layer, or for every batch-norm
    layer (ours and Keras's) of a model: moving statistics, gamma, beta and
    Batch Renormalization's weights. With the initial ones (0, 1, 1, 0) a
    layer is nearly the identity at inference and a wrong result could
    still predict the same.

    Args:
        layer_or_model: A built batch-norm layer, or a model.
        rng: A `np.random.Generator`, or an int seed.

    Returns:
        `layer_or_model`.
    """
    rng = np.random.default_rng(rng)
    # Renorm's weights from a child generator: the other draws stay those
    # of a layer without them.
    renorm_rng = rng.spawn(1)[0]
    layers = ([layer_or_model] if isinstance(layer_or_model, BN_CLASSES)
              else all_layers(layer_or_model))
    for layer in layers:
        if not isinstance(layer, BN_CLASSES):
            continue
        for name, (low, high) in _RANGES.items():
            variable = getattr(layer, name, None)
            if variable is None:  # center=False / scale=False / no renorm
                continue
            source = renorm_rng if name in _RENORM else rng
            variable.assign(source.uniform(low, high, variable.shape)
                            .astype(variable.dtype))
    return layer_or_model


def weights64(layer) -> dict:
    """`{name: float64 NumPy value}` of every weight of `layer`."""
    return {v.name: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
            for v in layer.weights}

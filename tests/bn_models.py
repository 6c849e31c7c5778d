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


def randomize_bn(model, seed: int = 0):
    """Random moving statistics, gamma and beta for every batch-norm layer
    (ours and Keras's): with the initial ones (0, 1, 1, 0) a layer is
    nearly the identity at inference and a wrong result could still
    predict the same. Returns `model`."""
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        if isinstance(layer, BN_CLASSES):
            for variable, low, high in (
                (layer.moving_mean, -1.0, 1.0),
                (layer.moving_variance, 0.3, 3.0),
                (layer.gamma, 0.5, 1.5),
                (layer.beta, -0.5, 0.5),
            ):
                if variable is not None:  # center=False / scale=False
                    variable.assign(rng.uniform(low, high, variable.shape)
                                    .astype(variable.dtype))
    return model

"""Layers of keras_bn."""

from keras_bn.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]

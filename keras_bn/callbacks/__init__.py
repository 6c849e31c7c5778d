"""Callbacks around batch normalization, one class per module."""

from keras_bn.callbacks.activation_percentiles import ActivationPercentiles
from keras_bn.callbacks.recalibrate_statistics import RecalibrateStatistics

__all__ = ["ActivationPercentiles", "RecalibrateStatistics"]

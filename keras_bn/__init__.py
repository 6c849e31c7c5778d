"""keras_bn: exact, fast Batch Normalization for Keras 3.

Works on the TensorFlow, JAX and PyTorch backends.
"""

from keras_bn import callbacks
from keras_bn import datasets
from keras_bn import interop
from keras_bn import models
from keras_bn.convert import convert
from keras_bn.fold import fold
from keras_bn.layers import BatchNormalization
from keras_bn.recalibrate import recalibrate
from keras_bn.set_statistics import set_statistics
from keras_bn.sync_moving_statistics import sync_moving_statistics

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "callbacks", "convert", "datasets", "fold",
           "interop", "models", "recalibrate", "set_statistics",
           "sync_moving_statistics", "__version__"]

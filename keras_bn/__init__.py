"""keras_bn: exact, fast Batch Normalization for Keras 3.

Works on the TensorFlow, JAX and PyTorch backends.
"""

from keras_bn.layers import BatchNormalization

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "__version__"]

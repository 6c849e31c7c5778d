"""What `keras.ops` cannot express, one small module per backend.

`cross_replica(count, mean, m2)` pools per-replica statistics inside a
distributed step; `fused_*` are the backends' own fused kernels.
"""

from __future__ import annotations

import importlib

import keras


def _module():
    return importlib.import_module(
        f"keras_bn.backends.{keras.backend.backend()}_backend"
    )


def cross_replica(count, mean, m2):
    """Pools `(count, mean, m2)` over the replicas of a distributed step.

    Outside a distribution context this returns its arguments unchanged.
    """
    return _module().cross_replica(count, mean, m2)


def fused_train(inputs, gamma, beta, epsilon: float, axis: int):
    """The backend's fused training-mode batch norm, or None to decline.

    Args:
        inputs: The layer's input, already cast to the statistics dtype.
        gamma, beta: Per-channel scale and offset (1-D), or None.
        epsilon: Added to the variance.
        axis: The single (non-negative) feature axis.

    Returns:
        `(outputs, mean, variance)` with 1-D biased batch statistics, or
        `None` when no fused kernel gives the reference path's results here.
    """
    fn = getattr(_module(), "fused_train", None)
    return None if fn is None else fn(inputs, gamma, beta, epsilon, axis)


def fused_infer(inputs, mean, variance, gamma, beta, epsilon: float, axis: int):
    """The backend's fused inference-mode batch norm, or None to decline."""
    fn = getattr(_module(), "fused_infer", None)
    if fn is None:
        return None
    return fn(inputs, mean, variance, gamma, beta, epsilon, axis)

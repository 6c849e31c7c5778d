"""What `keras.ops` cannot express, one small module per backend.

`num_replicas` and `cross_replica` deal with distributed steps; `fused_*`
are the backends' own fused kernels.
"""

from __future__ import annotations

import importlib

import keras


_MODULES = {}


def _module():
    # Looked up in a dict after the first import: torch.compile cannot trace
    # `importlib.import_module` (a graph break, and fullgraph=True fails).
    name = keras.backend.backend()
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(
            f"keras_bn.backends.{name}_backend"
        )
    return module


def num_replicas() -> int:
    """How many data-parallel replicas the current step runs on (1 if none).

    TensorFlow: the replicas of the `tf.distribute` strategy in whose replica
    context the layer is called. JAX: the batch shards of the active
    `keras.distribution`. PyTorch: the world size of `torch.distributed`.
    """
    return _module().num_replicas()


def replica_sees_global_batch() -> bool:
    """True where one layer call sees the whole global batch (JAX under
    `keras.distribution`: the step is compiled once over globally sharded
    arrays, so plain reductions already give global-batch statistics)."""
    return getattr(_module(), "SEES_GLOBAL_BATCH", False)


def cross_replica(count, shift, delta, m2):
    """Global-batch statistics from each replica's `(count, shift, delta, m2)`.

    One collective gathers every replica's statistics; they are pooled with
    `moments.combine` relative to the local `shift`.

    Returns:
        `(count, delta, m2)` of the global batch (mean `shift + delta`).
    """
    return _module().cross_replica(count, shift, delta, m2)


def fused_train(inputs, gamma, beta, epsilon: float, axis: int,
                exact: bool = True):
    """The backend's fused training-mode batch norm, or None to decline.

    Args:
        inputs: The layer's input: float32, or float16/bfloat16 when that
            is the layer's compute dtype (statistics stay float32).
        gamma, beta: Per-channel float32 scale and offset (1-D), or None.
        epsilon: Added to the variance.
        axis: The single (non-negative) feature axis.
        exact: Only a path as exact as the reference path (float32 sums
            kept short); `False` also allows the backend's kernel as it is
            (its float32 sums over the whole batch drift past 1e-5 on
            long reductions on CPU).

    Returns:
        `(outputs, mean, variance)` with 1-D biased batch statistics, or
        `None` to decline.
    """
    fn = getattr(_module(), "fused_train", None)
    return None if fn is None else fn(inputs, gamma, beta, epsilon, axis,
                                      exact)


def fused_infer(inputs, mean, variance, gamma, beta, epsilon: float, axis: int):
    """The backend's fused inference-mode batch norm, or None to decline."""
    fn = getattr(_module(), "fused_infer", None)
    if fn is None:
        return None
    return fn(inputs, mean, variance, gamma, beta, epsilon, axis)


try:  # Imported now, so that the first layer call may be a compiled one.
    _module()
except ImportError:  # a backend without a module of its own here
    pass

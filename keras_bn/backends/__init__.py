"""What `keras.ops` cannot express: one module per backend, one contract.

Each `keras_bn/backends/<name>_backend.py` implements `Backend` below
(`tests/test_backends.py` checks it on every backend). The module is
imported once, when this package is first imported under that backend,
and looked up in a dict afterwards (torch.compile cannot trace
`importlib`). Backends provide facts and kernels; `keras_bn.paths` decides
which kernel, if any, runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from collections.abc import Mapping
from typing import Protocol

import keras

from keras_bn.backends import _shared


class Backend(Protocol):
    """The contract of a backend module.

    Attributes:
        SEES_GLOBAL_BATCH: True where one layer call sees the whole global
            batch (JAX under `keras.distribution`: the step is compiled
            once over globally sharded arrays, so plain reductions already
            give global-batch statistics).
        TRAIN: `{path: kernel}` with
            `kernel(x, gamma, beta, epsilon, axis) -> (y, mean, variance)`:
            `x` float32 (or float16/bfloat16 when that is the compute
            dtype), `gamma`/`beta` 1-D float32 or None, `axis` the single
            non-negative feature axis; `y` in `x`'s dtype, `mean` and the
            biased `variance` 1-D float32, gradients flowing to `x`, `gamma`
            and `beta` only.
        INFER: `{path: kernel}` with
            `kernel(x, mean, variance, gamma, beta, epsilon, axis) -> y`,
            or None to hand the call back to the reference path.
    """

    SEES_GLOBAL_BATCH: bool
    TRAIN: Mapping[str, Callable]
    INFER: Mapping[str, Callable]

    def num_replicas(self) -> int:
        """How many data-parallel replicas the current step runs on: the
        replicas of the `tf.distribute` strategy whose replica context the
        call is in, the batch shards of the active `keras.distribution`,
        or the world size of `torch.distributed` (1 if none)."""

    def cross_replica(self, count, shift, delta, m2,
                      group_size: int | None = None):
        """Global-batch `(count, delta, m2)` from each replica's
        `(count, shift, delta, m2)`, pooled with `moments.combine` relative
        to the local `shift` (mean `shift + delta`), differentiably; with
        `group_size`, pooled over this replica's group of that many
        consecutive replicas only (it divides the number of replicas)."""

    def context(self) -> dict:
        """Facts of the current trace that `keras_bn.paths.Call` reads:
        any of `gpu`, `xla` (TensorFlow tracing for XLA) and `compiling`
        (torch.compile or torch.export tracing)."""

    def assign_moving_average(self, variable, value, momentum: float, ok):
        """Sets the Keras `variable` to `old * momentum + value * (1 -
        momentum)` where `ok` holds (everywhere if `ok` is None), leaving
        it unchanged elsewhere, and returns the new value in `value`'s
        dtype; `value` is per channel in the variable's shape, and its
        gradient (the reference path's statistics carry one) is not
        followed. `_shared.assign_moving_average` in `keras.ops`; a backend
        whose layer calls run op by op (eager PyTorch) may write the
        variable's storage with its own ops, computing the same formula,
        wherever `variable.assign` would do no more than that."""


class _Reference:
    """A backend without a module here (e.g. numpy): reference path only."""

    SEES_GLOBAL_BATCH = False
    TRAIN: Mapping[str, Callable] = {}
    INFER: Mapping[str, Callable] = {}

    @staticmethod
    def num_replicas() -> int:
        return 1

    @staticmethod
    def cross_replica(count, shift, delta, m2, group_size=None):
        return count, delta, m2

    @staticmethod
    def context() -> dict:
        return {}

    assign_moving_average = staticmethod(_shared.assign_moving_average)


_MODULES: dict = {}


def get() -> Backend:
    """The module of the current Keras backend."""
    name = keras.backend.backend()
    module = _MODULES.get(name)
    if module is None:
        path = f"keras_bn.backends.{name}_backend"
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as error:
            if error.name != path:
                raise  # the module exists, something it imports does not
            module = _Reference
        _MODULES[name] = module
    return module


get()  # Imported now, so that the first layer call may be a compiled one.

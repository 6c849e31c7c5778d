"""Precise batch-normalization statistics: `keras_bn.recalibrate`."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

from keras_bn import _validation as check
from keras_bn import _compat
from keras_bn import moments
from keras_bn.layers import BatchNormalization

_BN_TYPES = (keras.layers.BatchNormalization, BatchNormalization)
MODES = ("inference", "train")
_DEFAULT_BATCH_SIZE = 32


def recalibrate(
    model: keras.layers.Layer,
    data,
    steps: int | None = None,
    *,
    batch_size: int | None = None,
    mode: str = "inference",
    verbose: int | str = "auto",
) -> keras.layers.Layer:
    """Sets the moving statistics of every batch-norm layer from `data`.

    Runs `model` over `data` and sets the `moving_mean` and
    `moving_variance` of each `keras_bn.BatchNormalization` and
    `keras.layers.BatchNormalization` layer (nested models included) to the
    exact mean and biased variance of the values that layer receives,
    pooled over all batches (Chan et al.'s parallel formula, not an
    exponential average and not an average of per-batch variances). Use it
    after training with a bad `momentum`, after averaging weights (SWA),
    or after changing the data distribution. No other weight changes; for
    Batch Renormalization layers `moving_stddev` is also set, to
    `sqrt(moving_variance + epsilon)`.

    The modes differ in what the upstream layers do while a layer's inputs
    are collected:

    - `"inference"` (default): everything runs in inference mode and the
      layers are recalibrated in the order the model calls them, each one
      with the already recalibrated layers before it. Afterwards every
      layer normalizes exactly the inputs it receives at inference, so on
      `data` its outputs have mean `beta` and variance
      `gamma**2 * var / (var + epsilon)` per channel. This costs one pass
      over `data` per batch-norm layer (each pass stops right after that
      layer; about half the model's cost on average).
    - `"train"`: one pass, with the batch-norm layers normalizing each batch
      with its own statistics as in training (other layers, e.g. dropout,
      stay in inference mode), the population statistics that training's
      moving averages estimate (like fvcore's PreciseBN and
      `torch.optim.swa_utils.update_bn`, but pooled exactly). Results
      depend on the batch size.

    A layer called several times per forward pass pools the inputs of all
    its calls; masks are honoured as the layer's own training step does.
    Channels that receive no values, or non-finite ones, keep their moving
    statistics (with a warning).

    Args:
        model: A built or unbuilt Keras model or layer containing batch
            normalization layers. It is called eagerly as
            `model(x, training=False)`.
        data: The inputs: a NumPy array or tensor, or a dict of them, split
            into batches of `batch_size`; or a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or any iterable (a generator, a list,
            a `torch.utils.data.DataLoader`) of batches `x`, `(x,)`,
            `(x, y)` or `(x, y, sample_weight)`, of which only `x` is used.
            In `"inference"` mode with several batch-norm layers, `data` is
            iterated once per layer: a one-shot iterator is kept in memory
            after its first pass, and a dataset that reshuffles should not
            be combined with `steps`, or each layer sees other samples.
        steps: Number of batches to use per pass; `None` uses all of
            `data` (required for infinite datasets).
        batch_size: Batch size for array inputs, default 32. Must not be
            given for datasets, generators and other iterables.
        mode: `"inference"` or `"train"`, see above.
        verbose: `"auto"` or 1 shows a progress bar, 2 a single line at the
            end, 0 nothing.

    Returns:
        `model`, whose batch-norm layers now hold the new statistics.

    Raises:
        ValueError: If `model` has no batch-norm layer or none is called,
            if `data` yields no batch, or an argument is out of range.
        TypeError: If an argument has the wrong type.
    """
    check.keras_layer("model", model)
    layers = _bn_layers(model)
    if not layers:
        raise ValueError(
            "`model` has no batch normalization layer (keras_bn."
            "BatchNormalization or keras.layers.BatchNormalization). "
            f"Received: model={model.name!r}"
        )
    steps = check.integer("steps", steps, allow_none=True)
    batch_size = check.integer("batch_size", batch_size, allow_none=True)
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: "
                         f"mode={mode!r}")
    if verbose == "auto":
        verbose = 1
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2. Received: "
                         f"verbose={verbose!r}")
    batches = _Batches(data, steps, batch_size,
                       many_passes=mode == "inference" and len(layers) > 1)
    collector = _Collector(mode)
    passes = 1 if mode == "train" else len(layers)
    progbar = keras.utils.Progbar(
        None if batches.count is None else passes * batches.count,
        verbose=verbose, unit_name="batch",
    )
    with _hooked(layers, collector):
        if mode == "train":
            try:
                collector.run(model, batches, progbar)
            finally:
                collector.restore()
            for layer, pooled in collector.pooled.items():
                _assign(layer, pooled)
        else:
            collector.run(model, batches, progbar)
            order = collector.order
            for index, layer in enumerate(order):
                if index:
                    collector.target = layer
                    collector.run(model, batches, progbar)
                _assign(layer, collector.pooled.pop(layer))
            if progbar.target is not None and collector.done < progbar.target:
                # Uncalled layers take no pass: finish the bar early.
                progbar.update(collector.done, finalize=True)
    uncalled = [layer.name for layer in layers
                if layer not in collector.calls]
    if len(uncalled) == len(layers):
        raise ValueError(f"None of the batch normalization layers of "
                         f"{model.name!r} was called by the model.")
    if uncalled:
        warnings.warn(f"recalibrate: the batch normalization layers "
                      f"{uncalled} were not called by the model and keep "
                      f"their moving statistics.", stacklevel=2)
    return model


def _bn_layers(model) -> list:
    # Recursive and de-duplicated: nested models, wrappers and shared
    # layers are covered.
    return [layer for layer in _compat.flatten_layers(model)
            if isinstance(layer, _BN_TYPES)]


class _StopForward(Exception):
    """Ends a forward pass once the layer being calibrated has its inputs."""


class _hooked:
    """Routes every call of `layers` through `collector` while active.

    The hook is an instance attribute shadowing the class's `call`, which
    `Layer.__call__` looks up: it works for any model (functional,
    sequential, nested, subclassed) on every backend, in eager mode.
    """

    def __init__(self, layers, collector):
        self.layers = layers
        self.collector = collector

    def __enter__(self):
        for layer in self.layers:
            _compat.shadow_call(layer, self._hook(layer, layer.call))

    def __exit__(self, *exc_info):
        for layer in self.layers:
            _compat.unshadow_call(layer)

    def _hook(self, layer, original):
        collector = self.collector

        def call(inputs, training=None, mask=None, **kwargs):
            collector.observe(layer, inputs, mask)
            if collector.mode == "train":
                training = True
            return original(inputs, training=training, mask=mask, **kwargs)

        return call


class _Collector:
    """Pools the inputs of the batch-norm layers over the batches.

    In `"train"` mode every layer pools its inputs in one pass. In
    `"inference"` mode one `target` layer pools per pass; the first pass
    also records the order in which the layers are called and how often,
    and later forward passes stop after the target's last call.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.target = None
        self.order = []  # layers, in the order of their first call
        self.calls = {}  # layer -> calls per forward pass
        self.pooled = {}  # layer -> (count, mean, m2)
        self.done = 0  # forward passes, for the progress bar
        self._saved = {}  # layer -> non-trainable values, in "train" mode
        self._discovering = True
        self._seen = 0

    def run(self, model, batches, progbar):
        for x in batches:
            self.done += 1
            self._seen = 0
            try:
                model(x, training=False)
            except _StopForward:
                pass
            self._discovering = False
            progbar.add(1)
        if not batches.yielded:
            raise ValueError(f"`data` yielded no batch. Received: "
                             f"data={check.describe(batches.data)}")

    def restore(self):
        for layer, values in self._saved.items():
            for variable, value in zip(layer.non_trainable_variables, values):
                variable.assign(value)

    def observe(self, layer, inputs, mask):
        if self._discovering:
            if layer not in self.calls:
                self.order.append(layer)
                self.calls[layer] = 0
            self.calls[layer] += 1
            if self.target is None and self.mode == "inference":
                self.target = layer
        if self.mode == "train":
            if layer not in self._saved:
                # Training calls update the moving averages (and renorm's):
                # keep the values to restore (the layer is built by now).
                self._saved[layer] = [np.array(ops.convert_to_numpy(v))
                                      for v in layer.non_trainable_variables]
            self._pool(layer, inputs, mask)
        elif layer is self.target:
            self._pool(layer, inputs, mask)
            if not self._discovering:
                self._seen += 1
                if self._seen == self.calls[layer]:
                    raise _StopForward()

    def _pool(self, layer, inputs, mask):
        x = ops.convert_to_tensor(inputs)
        x = ops.cast(x, keras.backend.result_type(x.dtype, "float32"))
        weights = _mask_weights(layer, x, mask)
        count, mean, m2 = (
            ops.reshape(t, layer.moving_mean.shape)
            for t in moments.moments(x, _compat.reduction_axes(layer), weights)
        )
        if layer in self.pooled:
            old_count, old_mean, old_m2 = self.pooled[layer]
            # Pooled mean as an offset from the running one: small, exact.
            count, delta, m2 = moments.combine(
                ops.stack([old_count, count]),
                ops.stack([old_mean, mean]),
                ops.zeros((2,) + tuple(mean.shape), mean.dtype),
                ops.stack([old_m2, m2]),
                shift=old_mean,
            )
            mean = old_mean + delta
        self.pooled[layer] = (count, mean, m2)


def _mask_weights(layer, x, mask):
    """The mask as the layer's own training step applies it."""
    if mask is None:
        return None
    if isinstance(layer, BatchNormalization):
        return layer._mask_weights(mask, x)
    # keras.layers.BatchNormalization appends a last axis to its mask.
    return ops.expand_dims(mask, -1)


def _assign(layer, pooled):
    count, mean, m2 = pooled
    variance = m2 / ops.maximum(count, 1.0)
    ok = moments.finite(count, mean, variance)
    if not bool(ops.all(ok)):
        bad = int(ops.sum(ops.cast(ops.logical_not(ok), "int32")))
        warnings.warn(f"recalibrate: {bad} channel(s) of layer "
                      f"{layer.name!r} received no finite values and keep "
                      f"their moving statistics.", stacklevel=3)
    old_mean = ops.cast(layer.moving_mean, mean.dtype)
    old_variance = ops.cast(layer.moving_variance, mean.dtype)
    mean = ops.where(ok, mean, old_mean)
    variance = ops.where(ok, variance, old_variance)
    layer.moving_mean.assign(ops.cast(mean, layer.moving_mean.dtype))
    layer.moving_variance.assign(
        ops.cast(variance, layer.moving_variance.dtype)
    )
    if getattr(layer, "renorm", False):
        # Inference reads moving_variance; the layer keeps
        # moving_variance == moving_stddev**2 - epsilon, so keep that too.
        layer.moving_stddev.assign(ops.cast(
            ops.sqrt(variance + layer.epsilon), layer.moving_stddev.dtype
        ))
    if isinstance(layer, BatchNormalization):
        layer._statistics_measured()


class _Batches:
    """Re-iterable model inputs `x`, at most `steps` batches per pass."""

    def __init__(self, data, steps, batch_size, many_passes):
        self.data = data
        self.steps = steps
        self.yielded = 0
        self._cache = None
        self._make_iterator, count = self._source(data, batch_size)
        if count is not None and count < 0:  # tf.data: infinite / unknown
            if count == -1 and steps is None:
                raise ValueError("`data` is an infinite dataset: pass `steps`."
                                 f" Received: steps=None")
            count = None
        if count is None and steps is None and self._infinite:
            raise ValueError("`data` has no end (num_batches is None): pass "
                             "`steps`. Received: steps=None")
        self.count = steps if count is None else (
            count if steps is None else min(count, steps)
        )
        if many_passes and self._one_shot:
            self._cache = []

    def _source(self, data, batch_size):
        self._infinite = False
        self._one_shot = False
        if _is_array(data) or (
            isinstance(data, dict) and data
            and all(_is_array(v) for v in data.values())
        ):
            batch_size = batch_size or _DEFAULT_BATCH_SIZE
            size = int(keras.tree.flatten(data)[0].shape[0])

            def slices():
                for start in range(0, size, batch_size):
                    yield keras.tree.map_structure(
                        lambda a: a[start:start + batch_size], data
                    )

            return slices, math.ceil(size / batch_size)
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is only for array inputs; datasets, generators "
                f"and iterables bring their own batches. Received: batch_size="
                f"{batch_size!r} with data={check.describe(data)}"
            )
        if isinstance(data, keras.utils.PyDataset):
            count = data.num_batches
            self._infinite = count is None

            def items():
                indices = itertools.count() if count is None else range(count)
                return (data[i] for i in indices)

            return items, count
        if hasattr(data, "as_numpy_iterator") and hasattr(data, "cardinality"):
            # tf.data.Dataset: NumPy batches work on every backend.
            return data.as_numpy_iterator, int(data.cardinality())
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(
                "`data` must be an array, a dict of arrays, a tf.data.Dataset, "
                "a keras.utils.PyDataset or an iterable of batches. Received: "
                f"data={check.describe(data)}"
            ) from None
        count = len(data) if hasattr(data, "__len__") else None
        if iterator is data:
            self._one_shot = True
            return lambda: iterator, count
        return lambda: iter(data), count

    def __iter__(self) -> Iterator:
        if self._cache is not None and self.yielded:
            yield from self._cache
            return
        batches = self._make_iterator()
        for batch in itertools.islice(batches, self.steps):
            x = keras.utils.unpack_x_y_sample_weight(batch)[0]
            x = keras.tree.map_structure(_to_array, x)
            self.yielded += 1
            if self._cache is not None:
                self._cache.append(x)
            yield x


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or ops.is_tensor(value)


def _to_array(value):
    return value if _is_array(value) else np.asarray(value)

"""Converting existing models to `keras_bn.BatchNormalization`."""

from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np
from keras import ops

# Not exported by Keras; the class `keras.models.clone_model` rebuilds.
from keras.src.models.functional import Functional

from keras_bn.layers import BatchNormalization

_OVERRIDABLE = tuple(
    name for name in inspect.signature(BatchNormalization.__init__).parameters
    if name not in ("self", "kwargs")
)


def convert(model: keras.layers.Layer, **overrides) -> keras.layers.Layer:
    """Returns a copy of `model` using `keras_bn.BatchNormalization`.

    The counterpart of PyTorch's `SyncBatchNorm.convert_sync_batchnorm`:
    every `keras.layers.BatchNormalization` of a Sequential or functional
    model, nested models included, is replaced by a
    `keras_bn.BatchNormalization` with the same configuration (name,
    trainable flag and dtype policy included) and the same weights, so the
    converted model predicts what the original does. `overrides` then
    change arguments of every batch-norm layer, e.g.
    `convert(model, synchronized=True)` or
    `convert(model, virtual_batch_size=32)`; they also apply to the
    `keras_bn.BatchNormalization` layers already in the model.

    The original model is left untouched: every layer of the result is a
    new layer with a copy of the original's weights (a layer shared inside
    the original stays shared in the copy). Compile the copy before
    training it; optimizer state is not carried over.

    Subclasses of `keras.layers.BatchNormalization` are copied unconverted,
    with a warning, since they may change the layer's behaviour. Layers
    that hold batch-norm layers inside their own code (subclassed models
    and layers) cannot be rebuilt and raise a `TypeError`.

    Args:
        model: A Keras model (Sequential, functional, possibly nested) or a
            single batch-norm layer.
        **overrides: Arguments of `keras_bn.BatchNormalization`'s
            constructor (not `name`, `dtype` or `trainable`) to set on every
            batch-norm layer. An override that changes the weights (e.g.
            `center=False`, `renorm=True`) changes predictions; new renorm
            weights start from the layer's moving statistics.

    Returns:
        The converted copy of `model`.

    Raises:
        TypeError: If `model` is not a Keras layer, an override is not an
            argument of `keras_bn.BatchNormalization`, or a subclassed
            layer holds batch-norm layers.
        ValueError: If an override has an invalid value.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer. Received: "
                        f"model={model!r} (of type {type(model).__name__})")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(
            f"convert() got unknown override(s) {unknown}; overrides must be "
            f"arguments of keras_bn.BatchNormalization: {list(_OVERRIDABLE)}"
        )
    BatchNormalization(**overrides)  # Bad values fail now, not mid-copy.
    converter = _Converter(overrides)
    converted = converter.clone(model)
    converter.copy_state()
    return converted


class _Converter:
    """Clones layers, remembering each (original, copy) pair."""

    def __init__(self, overrides: dict):
        self.overrides = overrides
        self.pairs = {}  # id(original) -> (original, copy), in clone order

    def clone(self, layer):
        if id(layer) in self.pairs:  # Shared layers stay shared.
            return self.pairs[id(layer)][1]
        if isinstance(layer, (keras.Sequential, Functional)):
            # Recursing here rather than with `recursive=True` gives every
            # nested pair, models included, and one memo across levels.
            copy = keras.models.clone_model(layer, clone_function=self.clone)
        elif isinstance(layer, BatchNormalization) or (
            type(layer) is keras.layers.BatchNormalization
        ):
            cls = type(layer) if isinstance(layer, BatchNormalization) else (
                BatchNormalization
            )
            copy = cls.from_config({**layer.get_config(), **self.overrides})
        else:
            if isinstance(layer, keras.layers.BatchNormalization):
                warnings.warn(
                    f"convert: {layer.name!r} is a subclass of keras.layers."
                    f"BatchNormalization ({type(layer).__name__}) and is "
                    "copied unconverted.", stacklevel=3,
                )
            self._check_no_hidden_bn(layer)
            copy = type(layer).from_config(layer.get_config())
        self.pairs[id(layer)] = (layer, copy)
        return copy

    @staticmethod
    def _check_no_hidden_bn(layer):
        hidden = [
            inner.name for inner in layer._flatten_layers(include_self=False)
            if isinstance(inner, (keras.layers.BatchNormalization,
                                  BatchNormalization))
        ]
        if hidden:
            raise TypeError(
                f"convert() can only rebuild Sequential and functional "
                f"models, but {layer.name!r} ({type(layer).__name__}) holds "
                f"the batch normalization layers {hidden} in its own code. "
                "Build it with keras_bn.BatchNormalization instead."
            )

    def copy_state(self):
        pairs = list(self.pairs.values())
        containers = [p for p in pairs if isinstance(p[0], keras.Model)]
        leaves = [p for p in pairs if not isinstance(p[0], keras.Model)]
        # Models are recorded after their layers: reversed, outer ones come
        # first, so that inner settings override what they propagate.
        for original, copy in reversed(containers):
            self._build_like(original, copy)
            copy.trainable = original.trainable
        for original, copy in leaves:
            self._build_like(original, copy)
            if original.built:
                if isinstance(copy, BatchNormalization):
                    _copy_bn_weights(original, copy)
                else:
                    copy.set_weights(original.get_weights())
            copy.trainable = original.trainable

    @staticmethod
    def _build_like(original, copy):
        # A Sequential model without an Input, built by a call, clones
        # unbuilt; so does a layer only ever called inside it.
        if original.built and not copy.built:
            copy.build_from_config(original.get_build_config())


def _copy_bn_weights(original, copy):
    """Copies weights by name, so overrides may add or drop weights."""
    values = {v.name: np.array(ops.convert_to_numpy(v))
              for v in original.weights}
    if copy.renorm and "moving_stddev" not in values:
        # renorm=True override: renorm statistics start where inference is.
        stddev = np.sqrt(values["moving_variance"] + copy.epsilon)
        values.update(moving_stddev=stddev, renorm_stddev=stddev,
                      renorm_mean=values["moving_mean"])
    for variable in copy.weights:
        if variable.name in values:
            variable.assign(values[variable.name])

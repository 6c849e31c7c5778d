"""Converting models to `keras_bn.BatchNormalization`, and back."""

from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np
from keras import ops

from keras_bn import _compat
from keras_bn import _validation as check
from keras_bn._compat import Functional

from keras_bn.layers import BatchNormalization

_OVERRIDABLE = tuple(
    name for name in inspect.signature(BatchNormalization.__init__).parameters
    if name not in ("self", "kwargs")
)
_KERAS_BN = keras.layers.BatchNormalization
_KERAS_OVERRIDABLE = tuple(
    name for name in inspect.signature(_KERAS_BN.__init__).parameters
    if name not in ("self", "kwargs")
)


def keras_layer_config(config: dict, name: str, training: bool) -> dict:
    """Maps a `keras_bn.BatchNormalization` config onto Keras's layer.

    `data_format` is already resolved into `axis`; `fused` and
    `skip_nonfinite_updates` only change how (and whether, on non-finite
    batches) training computes, so they are dropped. `virtual_batch_size`,
    `synchronized_group_size`, `statistics`, `update_moving_statistics`,
    `moving_statistics_steps` and `debias_moving_statistics` change
    training: with `training=True` a set one raises, with
    `training=False` (an inference-only copy) it is dropped. So do
    PyTorch's update rules (`momentum=None`, whose copy gets Keras's
    default momentum, and `moving_variance_estimator="unbiased"`).

    Raises:
        ValueError: If `axis` holds several axes (Keras's layer takes one),
            or, with `training=True`, if one of those is set or
            PyTorch's update rules are on.
    """
    axis = config["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"keras.layers.BatchNormalization takes a single axis, but "
                f"{name!r} normalizes over axis={list(axis)}; it has no "
                "Keras equivalent."
            )
        axis = axis[0]
    # These two act in inference too: even an inference-only copy would
    # predict (or update) differently.
    for option, value in (("statistics", "batch"),
                          ("update_moving_statistics", True)):
        if config.get(option) == value:
            raise ValueError(
                f"{name!r} has {option}={value!r}, which keras.layers."
                "BatchNormalization cannot do (its inference differs). "
                f"Convert with `convert(model, {option}=None)` first if "
                "Keras's rule is what you want."
            )
    for option, default, plain in (
            ("virtual_batch_size", None, "plain"),
            ("synchronized_group_size", None, "fully synchronized"),
            ("statistics", None, "Keras's"),
            ("update_moving_statistics", None, "Keras's"),
            ("moving_statistics_steps", 1, "Keras's"),
            ("debias_moving_statistics", False, "Keras's")):
        if training and config.get(option, default) != default:
            raise ValueError(
                f"{name!r} has {option}={config[option]!r}, which keras."
                "layers.BatchNormalization cannot do (it changes training). "
                f"Convert with `convert(model, {option}={default!r})` first "
                f"if {plain} batch normalization is what you want."
            )
    pytorch_rules = {k: config.get(k) for k in ("momentum",
                                                "moving_variance_estimator")
                     if config.get(k, 0.99) in (None, "unbiased")}
    if training and pytorch_rules:
        options = ", ".join(f"{k}={v!r}" for k, v in pytorch_rules.items())
        raise ValueError(
            f"{name!r} has {options} (PyTorch's update rules), which "
            "keras.layers.BatchNormalization cannot do (they change "
            "training). Convert with `convert(model, momentum=0.99, "
            "moving_variance_estimator='biased')` first if Keras's rules "
            "are what you want."
        )
    keep = set(_KERAS_OVERRIDABLE) | {"name", "trainable", "dtype"}
    config = {**{k: v for k, v in config.items() if k in keep}, "axis": axis}
    if config.get("momentum", 0.99) is None:  # inference only: unused
        config["momentum"] = 0.99
    return config


def convert(model: keras.layers.Layer, to: type = BatchNormalization,
            **overrides) -> keras.layers.Layer:
    """Returns a copy of `model` using `keras_bn.BatchNormalization`.

    The counterpart of PyTorch's `SyncBatchNorm.convert_sync_batchnorm`:
    every `keras.layers.BatchNormalization` of a Sequential or functional
    model, nested models included, is replaced by a
    `keras_bn.BatchNormalization` with the same configuration (name,
    trainable flag and dtype policy included) and the same weights, so the
    converted model predicts what the original does. `overrides` then
    change arguments of every batch-norm layer, e.g.
    `convert(model, synchronized=True)` or
    `convert(model, virtual_batch_size=32)` or `convert(model,
    synchronized=True, synchronized_group_size=8)`; they also apply to the
    `keras_bn.BatchNormalization` layers already in the model.

    The original model is left untouched: every layer of the result is a
    new layer with a copy of the original's weights (a layer shared inside
    the original stays shared in the copy). Compile the copy before
    training it; optimizer state is not carried over.

    With `to=keras.layers.BatchNormalization` it goes the other way, for
    models shipped without keras-bn: every `keras_bn.BatchNormalization`
    becomes Keras's layer with the same weights and options (`data_format`
    as `axis`). `fused` and `skip_nonfinite_updates` are dropped: they
    only change how training computes (Keras's layer never skips
    non-finite batches). An option Keras's layer cannot express raises a
    `ValueError`: several axes, or a `virtual_batch_size` or
    `synchronized_group_size` (they change training; `convert(model,
    virtual_batch_size=None)` first drops one).

    Subclasses of the layer not converted to are copied unconverted, with
    a warning, since they may change the layer's behaviour. Layers
    that hold batch-norm layers inside their own code (subclassed models
    and layers) cannot be rebuilt and raise a `TypeError`.

    Args:
        model: A Keras model (Sequential, functional, possibly nested) or a
            single batch-norm layer.
        to: The batch-norm class of the result:
            `keras_bn.BatchNormalization` (default) or
            `keras.layers.BatchNormalization`.
        **overrides: Arguments of the constructor of `to` (not `name`,
            `dtype` or `trainable`) to set on every batch-norm layer. An
            override that changes the weights (e.g. `center=False`,
            `renorm=True`) changes predictions; new renorm weights start
            from the layer's moving statistics.

    Returns:
        The converted copy of `model`.

    Raises:
        TypeError: If `model` is not a Keras layer, `to` is neither
            batch-norm class, an override is not an argument of `to`, or a
            subclassed layer holds batch-norm layers.
        ValueError: If an override has an invalid value, or (with
            `to=keras.layers.BatchNormalization`) a layer has an option
            Keras's layer cannot express.
    """
    check.keras_layer("model", model)
    if to is not BatchNormalization and to is not _KERAS_BN:
        raise TypeError(
            "`to` must be keras_bn.BatchNormalization or keras.layers."
            f"BatchNormalization. Received: to={to!r}")
    allowed = _OVERRIDABLE if to is BatchNormalization else _KERAS_OVERRIDABLE
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(
            f"convert() got unknown override(s) {unknown}; overrides must be "
            f"arguments of {to.__module__}.{to.__name__}: {list(allowed)}"
        )
    to(**overrides)  # Bad values fail now, not mid-copy.
    converter = _Converter(overrides, to)
    converted = converter.clone(model)
    converter.copy_state()
    return converted


class _Converter:
    """Clones layers, remembering each (original, copy) pair."""

    def __init__(self, overrides: dict, to: type = BatchNormalization):
        self.overrides = overrides
        self.to = to
        self.pairs = {}  # id(original) -> (original, copy), in clone order

    def clone(self, layer):
        if id(layer) in self.pairs:  # Shared layers stay shared.
            return self.pairs[id(layer)][1]
        if isinstance(layer, (keras.Sequential, Functional)):
            # Recursing here rather than with `recursive=True` gives every
            # nested pair, models included, and one memo across levels.
            copy = keras.models.clone_model(layer, clone_function=self.clone)
        elif self.to is BatchNormalization and (
            isinstance(layer, BatchNormalization) or type(layer) is _KERAS_BN
        ):
            cls = type(layer) if isinstance(layer, BatchNormalization) else (
                BatchNormalization
            )
            copy = cls.from_config({**layer.get_config(), **self.overrides})
        elif self.to is _KERAS_BN and type(layer) in (BatchNormalization,
                                                      _KERAS_BN):
            config = layer.get_config()
            if type(layer) is BatchNormalization:
                config = keras_layer_config(config, layer.name, training=True)
            copy = _KERAS_BN.from_config({**config, **self.overrides})
        else:
            if isinstance(layer, (_KERAS_BN, BatchNormalization)):
                warnings.warn(
                    f"convert: {layer.name!r} is a subclass of a batch-norm "
                    f"layer ({type(layer).__name__}) and is copied "
                    "unconverted.", stacklevel=3,
                )
            self._check_no_hidden_bn(layer)
            copy = type(layer).from_config(layer.get_config())
        self.pairs[id(layer)] = (layer, copy)
        return copy

    @staticmethod
    def _check_no_hidden_bn(layer):
        hidden = [
            inner.name for inner in _compat.flatten_layers(layer, False)
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
                if isinstance(copy, (BatchNormalization, _KERAS_BN)):
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
    if getattr(copy, "debias_moving_statistics", False) and (
            "debias_weight" not in values):
        # debias_moving_statistics=True override: channels whose statistics
        # are still the initial values have had no update (weight 1); the
        # others are treated as measured (weight 0).
        initial = [np.array(ops.convert_to_numpy(v))
                   for v in (copy.moving_mean, copy.moving_variance)]
        values["debias_weight"] = (
            (values["moving_mean"] == initial[0])
            & (values["moving_variance"] == initial[1])).astype("float32")
    for variable in copy.weights:
        if variable.name in values:
            variable.assign(values[variable.name])

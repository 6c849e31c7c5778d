"""`set_statistics`: one switch for every batch-norm layer of a model."""

from __future__ import annotations

import keras

from keras_bn import _compat
from keras_bn import _validation as check
from keras_bn.layers import BatchNormalization


def set_statistics(model: keras.layers.Layer, statistics: str | None = None,
                   update_moving_statistics: bool | None = None) -> int:
    """Sets `statistics` and `update_moving_statistics` on every
    `keras_bn.BatchNormalization` of `model`, nested models included.

    For example `set_statistics(model, statistics="moving")` before
    fine-tuning freezes every layer's statistics while `gamma` and `beta`
    still train; `set_statistics(model)` restores Keras's rule.

    A change takes effect at the next trace of a call, as a change of
    `trainable` does: at once for eager calls (and for PyTorch's eager
    `fit`), but a model whose `fit`, `evaluate` or `predict` has already
    run compiled (TensorFlow's `tf.function`, JAX's `jit`) keeps its traced
    function until `model.compile(...)` is called again.

    Args:
        model: A Keras model or layer.
        statistics: `None`, `"batch"` or `"moving"`; see
            `keras_bn.BatchNormalization`.
        update_moving_statistics: `None`, `True` or `False`; see
            `keras_bn.BatchNormalization`.

    Returns:
        The number of layers set.

    Raises:
        TypeError: If `model` holds `keras.layers.BatchNormalization`
            layers, which have neither option (`keras_bn.convert` the model
            first).
    """
    check.keras_layer("model", model)
    check.choice("statistics", statistics, (None, "batch", "moving"))
    check.optional_bool("update_moving_statistics", update_moving_statistics)
    layers = _compat.flatten_layers(model)
    keras_layers = [layer.name for layer in layers
                    if isinstance(layer, keras.layers.BatchNormalization)]
    if keras_layers:
        raise TypeError(
            f"set_statistics: {keras_layers} are keras.layers."
            "BatchNormalization, which has no `statistics` or "
            "`update_moving_statistics`. Convert the model first: "
            "`model = keras_bn.convert(model)`.")
    ours = [layer for layer in layers
            if isinstance(layer, BatchNormalization)]
    for layer in ours:
        layer.statistics = statistics
        layer.update_moving_statistics = update_moving_statistics
    return len(ours)

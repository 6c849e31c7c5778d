"""The models of the batch-normalization articles, with a BN switch.

Each builder returns an uncompiled `keras.Sequential` with fixed layer names,
so the same architecture can be built with `keras_bn.BatchNormalization`,
with `keras.layers.BatchNormalization` (`norm_layer=...`) or without
normalization (`batch_norm=False`), and weights saved from one build load
into another build with the same switch. Inputs are floats in `[0, 1]`
(see `keras_bn.datasets.prepare`); MNIST models take 784 flattened pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from keras_bn.layers import BatchNormalization

# Hidden widths of the MNIST dense models; each hidden Dense is followed by BN.
_MNIST_VARIANTS = {
    "article3": (128,),   # Keras article: Dense(128, relu) -> BN -> Dense(10)
    "article1": (256,),   # TF1 article: Dense(256, relu) -> BN -> Dense(10)
    "article2": (64, 64),  # two Dense(64, relu) -> BN blocks
}


def _norm_factory(batch_norm: bool, norm_layer) -> Callable | None:
    """Returns the layer factory to use, or None without normalization."""
    if not isinstance(batch_norm, bool):
        raise TypeError(f"`batch_norm` must be True or False. Received: "
                        f"batch_norm={batch_norm!r}")
    if norm_layer is None:
        norm_layer = BatchNormalization
    if not callable(norm_layer):
        raise TypeError(
            "`norm_layer` must be a layer class or a callable that takes "
            f"`name=` and returns a layer. Received: norm_layer={norm_layer!r}"
        )
    return norm_layer if batch_norm else None


def _sequential(name: str, input_shape: tuple,
                blocks: list) -> keras.Sequential:
    return keras.Sequential([keras.Input(input_shape), *blocks], name=name)


def _model_name(base: str, batch_norm: bool) -> str:
    return f"{base}_bn" if batch_norm else base


def mnist_dense(
    variant: str = "article3",
    batch_norm: bool = True,
    norm_layer: Callable | None = None,
) -> keras.Sequential:
    """The articles' MNIST dense model: hidden ReLU layers, each then BN.

    Args:
        variant: `"article3"` (`Dense(128) -> BN -> Dense(10)`, the Keras
            article), `"article1"` (`Dense(256) -> BN -> Dense(10)`) or
            `"article2"` (`Dense(64) -> BN -> Dense(64) -> BN -> Dense(10)`).
            Hidden layers use ReLU, the output softmax.
        batch_norm: Whether to insert the normalization layers.
        norm_layer: Layer class or callable `f(name=...) -> layer`; defaults
            to `keras_bn.BatchNormalization`.

    Returns:
        An uncompiled `keras.Sequential` taking `(batch, 784)` floats and
        returning `(batch, 10)` class probabilities.
    """
    if variant not in _MNIST_VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(_MNIST_VARIANTS)}."
                         f" Received: variant={variant!r}")
    norm = _norm_factory(batch_norm, norm_layer)
    blocks = []
    for i, units in enumerate(_MNIST_VARIANTS[variant], start=1):
        blocks.append(layers.Dense(units, activation="relu", name=f"dense_{i}"))
        if norm:
            blocks.append(norm(name=f"batch_norm_{i}"))
    blocks.append(layers.Dense(10, activation="softmax", name="output"))
    return _sequential(_model_name(f"mnist_dense_{variant}", batch_norm),
                       (784,), blocks)


def mnist_sigmoid(
    batch_norm: bool = True, norm_layer: Callable | None = None
) -> keras.Sequential:
    """The paper's MNIST network: 3 hidden layers of 100 sigmoid units.

    As in Section 4.1 of Ioffe & Szegedy (2015), BN is inserted before each
    nonlinearity: `Dense(100) -> BN -> sigmoid`, three times, then
    `Dense(10, softmax)`. With BN the hidden `Dense` layers have no bias:
    the normalization subtracts it out and `beta` takes its role.

    Args:
        batch_norm: Whether to insert the normalization layers.
        norm_layer: Layer class or callable `f(name=...) -> layer`; defaults
            to `keras_bn.BatchNormalization`.

    Returns:
        An uncompiled `keras.Sequential` taking `(batch, 784)` floats and
        returning `(batch, 10)` class probabilities.
    """
    norm = _norm_factory(batch_norm, norm_layer)
    blocks = []
    for i in range(1, 4):
        blocks.append(layers.Dense(100, use_bias=not batch_norm,
                                   name=f"dense_{i}"))
        if norm:
            blocks.append(norm(name=f"batch_norm_{i}"))
        blocks.append(layers.Activation("sigmoid", name=f"sigmoid_{i}"))
    blocks.append(layers.Dense(10, activation="softmax", name="output"))
    return _sequential(_model_name("mnist_sigmoid", batch_norm), (784,), blocks)


def cifar10_conv(
    batch_norm: bool = True, norm_layer: Callable | None = None
) -> keras.Sequential:
    """The CIFAR-10 convolutional model of the Keras article.

    `Conv2D(32) -> BN -> MaxPool -> Conv2D(64) -> BN -> MaxPool ->
    Conv2D(64) -> BN -> Flatten -> Dense(64) -> Dropout(0.5) -> Dense(10)`;
    3x3 valid convolutions and the hidden Dense use ReLU, BN follows the
    activation as in the article.

    Args:
        batch_norm: Whether to insert the normalization layers.
        norm_layer: Layer class or callable `f(name=...) -> layer`; defaults
            to `keras_bn.BatchNormalization`. It normalizes the last
            (channels) axis.

    Returns:
        An uncompiled `keras.Sequential` taking `(batch, 32, 32, 3)` floats
        (channels last) and returning `(batch, 10)` class probabilities.
    """
    norm = _norm_factory(batch_norm, norm_layer)
    blocks = []
    for i, filters in enumerate((32, 64, 64), start=1):
        blocks.append(layers.Conv2D(filters, 3, activation="relu",
                                    data_format="channels_last",
                                    name=f"conv_{i}"))
        if norm:
            blocks.append(norm(name=f"batch_norm_{i}"))
        if i < 3:
            blocks.append(layers.MaxPooling2D(2, data_format="channels_last",
                                              name=f"pool_{i}"))
    blocks += [
        layers.Flatten(name="flatten"),
        layers.Dense(64, activation="relu", name="dense"),
        layers.Dropout(0.5, name="dropout"),
        layers.Dense(10, activation="softmax", name="output"),
    ]
    return _sequential(_model_name("cifar10_conv", batch_norm),
                       (32, 32, 3), blocks)

"""`ActivationPercentiles`: what batch normalization does to a layer's inputs
during training."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_bn import _validation as check


def _check_percentiles(percentiles) -> tuple[float, ...]:
    if isinstance(percentiles, (str, bytes)) or not isinstance(
        percentiles, Sequence
    ):
        raise TypeError("`percentiles` must be a sequence of numbers in "
                        f"[0, 100]. Received: percentiles={check.describe(percentiles)}")
    if not percentiles:
        raise ValueError("`percentiles` must hold at least one value. "
                         f"Received: percentiles={percentiles!r}")
    for p in percentiles:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError("`percentiles` must hold numbers in [0, 100]. "
                            f"Received: percentiles={percentiles!r}")
        if not 0.0 <= float(p) <= 100.0:
            raise ValueError("`percentiles` must lie in [0, 100]. Received: "
                             f"percentiles={percentiles!r}")
    return tuple(float(p) for p in percentiles)


class ActivationPercentiles(keras.callbacks.Callback):
    """Records percentiles of the input to one layer over training.

    This is the statistic of Figure 1(b, c) of Ioffe & Szegedy (2015): the
    15th, 50th and 85th percentiles of the input to one sigmoid unit, on a
    fixed set of examples, as training goes on. In the paper's MNIST network
    that distribution drifts without batch normalization ("internal
    covariate shift") and stays put with it. The callback runs the model up
    to `layer` on `data` before training and every `every` training
    batches, and keeps the percentiles of the chosen unit's values.

    Example:

    ```python
    model = keras_bn.models.mnist_sigmoid()
    recorder = keras_bn.callbacks.ActivationPercentiles(
        "sigmoid_3", data=x_test[:2000], every=50)
    model.fit(x_train, y_train, batch_size=60, callbacks=[recorder])
    plt.plot(recorder.steps, recorder.values)  # one line per percentile
    ```

    The model must be functional or a `keras.Sequential` with a known input
    shape, and `layer` one of its top-level layers called once (a layer
    shared between several calls has no single input).

    Args:
        layer: The layer whose input is recorded, or its name in the model.
        data: The model inputs to evaluate: an array or tensor of shape
            `(examples, ...)`, or a list/dict of them for a model with
            several inputs. A fixed sample, e.g. part of the test set.
        percentiles: Percentiles to record, numbers in `[0, 100]`, in the
            order of the columns of `values`. Computed as NumPy's
            `np.percentile` (linear interpolation) in float64.
        every: Record after every `every` training batches (counted across
            epochs; with `steps_per_execution > 1` a "batch" is one
            execution), and once before the first batch.
        unit: Index along the last axis of the layer's input (the feature
            or channel) to record. Its values at all other positions
            (examples, and pixels of images) are pooled. `None` pools all
            units.
        training: If `False` (the default), record what the model computes
            at inference: batch-normalization layers use their moving
            statistics and dropout is off. If `True`, record the
            training-mode input: each chunk of `batch_size` examples is
            normalized with its own batch statistics. Either way the
            recording never changes the model's weights or moving
            statistics.
        batch_size: Number of examples of `data` per forward pass.

    Attributes:
        steps: `int64` array `(records,)`, the number of training batches
            seen when each record was taken (0: before training).
        values: `float64` array `(records, len(percentiles))`.
        percentiles: The recorded percentiles, as a tuple of floats.

    Records start afresh at each `fit` call.
    """

    def __init__(
        self,
        layer: str | keras.layers.Layer,
        data,
        percentiles: Sequence[float] = (15, 50, 85),
        every: int = 100,
        unit: int | None = 0,
        training: bool = False,
        batch_size: int = 1024,
    ):
        super().__init__()
        if not isinstance(layer, (str, keras.layers.Layer)):
            raise TypeError("`layer` must be a layer name (str) or a "
                            f"keras.layers.Layer. Received: layer={check.describe(layer)}")
        if data is None:
            raise ValueError("`data` must hold the model inputs to record on."
                             " Received: data=None")
        if not isinstance(training, bool):
            raise TypeError("`training` must be True or False. Received: "
                            f"training={check.describe(training)}")
        self.layer = layer
        self.data = data
        self.percentiles = _check_percentiles(percentiles)
        self.every = check.integer("every", every, 1)
        self.unit = None if unit is None else check.integer("unit", unit, 0)
        self.training = training
        self.batch_size = check.integer("batch_size", batch_size, 1)
        self._num_examples = self._count_examples(data)
        self._probe = None
        self._reset()

    @staticmethod
    def _count_examples(data) -> int:
        sizes = {int(ops.shape(x)[0]) for x in tree.flatten(data)}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError("`data` must hold at least one example, and the "
                             "same number in every input. Received "
                             f"example counts {sorted(sizes)}")
        return sizes.pop()

    def _reset(self) -> None:
        self._steps: list[int] = []
        self._values: list[np.ndarray] = []
        self._step = 0

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype="int64")

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self._values, dtype="float64").reshape(
            -1, len(self.percentiles)
        )

    def _build_probe(self, model) -> keras.Model:
        if isinstance(self.layer, str):
            try:
                layer = model.get_layer(self.layer)
            except ValueError:
                names = [lay.name for lay in model.layers]
                raise ValueError(
                    f"`layer` names no layer of model {model.name!r}, whose "
                    f"layers are {names}. Received: layer={self.layer!r}"
                ) from None
        else:
            layer = self.layer
            if not any(lay is layer for lay in model.layers):
                raise ValueError(
                    f"`layer` {layer.name!r} is not a top-level layer of "
                    f"model {model.name!r}. Received: layer={layer!r}"
                )
        try:
            # A Sequential model has one input; a functional one keeps the
            # structure (list, dict) that `data` must follow.
            inputs = (model.inputs[0] if isinstance(model, keras.Sequential)
                      else model.input)
            return keras.Model(inputs, layer.input)
        except (AttributeError, ValueError, TypeError) as error:
            raise ValueError(
                f"Cannot read the input of layer {layer.name!r}: the model "
                "must be functional or a Sequential with a known input "
                "shape, and the layer called exactly once in it "
                f"({error})"
            ) from error

    def _unit_values(self, outputs) -> np.ndarray:
        outputs = ops.convert_to_numpy(outputs)
        if self.unit is None:
            return outputs.reshape(-1)
        if outputs.ndim < 2 or self.unit >= outputs.shape[-1]:
            raise ValueError(
                f"`unit` must index the last axis of the recorded layer "
                f"input, of shape {tuple(self._probe.output.shape)}. "
                f"Received: unit={self.unit}"
            )
        return outputs[..., self.unit].reshape(-1)

    def _record(self) -> None:
        model = self.model  # on JAX this syncs the trained values back
        if self._probe is None:
            self._probe = self._build_probe(model)
        chunks = []
        for start in range(0, self._num_examples, self.batch_size):
            batch = tree.map_structure(
                lambda x: x[start:start + self.batch_size], self.data
            )
            # The stateless scope discards the moving-statistics updates that
            # a training-mode call of a batch-normalization layer makes.
            with keras.StatelessScope():
                outputs = self._probe(batch, training=self.training)
            chunks.append(self._unit_values(outputs))
        values = np.concatenate(chunks).astype("float64")
        self._steps.append(self._step)
        self._values.append(np.percentile(values, self.percentiles))

    def on_train_begin(self, logs=None):
        self._reset()
        self._probe = None  # the model may have changed since the last fit
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self._record()

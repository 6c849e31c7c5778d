"""`RecalibrateStatistics`: batch-norm statistics that match the final
(averaged) weights."""

from __future__ import annotations

import keras

from keras_bn import _validation as check
from keras_bn.recalibrate import MODES
from keras_bn.recalibrate import recalibrate


class RecalibrateStatistics(keras.callbacks.Callback):
    """Runs `keras_bn.recalibrate` when training ends (and, optionally, at
    every epoch's end).

    With `use_ema=True`, Keras's optimizer overwrites the model's weights
    with their moving average when `fit` ends; SWA and schedule-free
    training swap weights the same way. The batch-norm statistics were
    gathered under the raw weights and no longer match. This callback runs
    after that overwrite (Keras finalizes the weights before
    `on_train_end` on every backend) and sets every batch-norm layer's
    moving statistics (ours and Keras's) to the exact statistics of its
    inputs under the final weights.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), ...)
    model.fit(x, y, callbacks=[
        keras_bn.callbacks.RecalibrateStatistics(x[:10000])])
    ```

    Args:
        data: What `recalibrate` runs the model over: an array (or a tuple
            of arrays; only inputs are used), a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or an iterable of batches.
        every_epoch: Also recalibrate at the end of every epoch (after its
            validation), so that evaluations and checkpoints taken then see
            statistics that match the weights of that moment; training then
            goes on from the recalibrated statistics.
        **recalibrate_kwargs: Passed on to `keras_bn.recalibrate`
            (`steps`, `batch_size`, `mode`, `verbose`; `verbose` defaults
            to 0 here).
    """

    def __init__(self, data, every_epoch: bool = False,
                 **recalibrate_kwargs):
        super().__init__()
        if not isinstance(every_epoch, bool):
            raise TypeError("`every_epoch` must be True or False. Received: "
                            f"every_epoch={check.describe(every_epoch)}")
        unknown = sorted(set(recalibrate_kwargs)
                         - {"steps", "batch_size", "mode", "verbose"})
        if unknown:
            raise TypeError(
                f"RecalibrateStatistics got unknown argument(s) {unknown}; "
                "the keyword arguments go to keras_bn.recalibrate, which "
                "takes steps, batch_size, mode and verbose")
        # Bad values fail now, not when training has ended.
        check.integer("steps", recalibrate_kwargs.get("steps"),
                      allow_none=True)
        check.integer("batch_size", recalibrate_kwargs.get("batch_size"),
                      allow_none=True)
        check.choice("mode", recalibrate_kwargs.get("mode", "inference"),
                     MODES)
        self.data = data
        self.every_epoch = every_epoch
        self.recalibrate_kwargs = {"verbose": 0, **recalibrate_kwargs}
        self.calls = 0  # how many times it has recalibrated

    def _recalibrate(self):
        recalibrate(self.model, self.data, **self.recalibrate_kwargs)
        self.calls += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epoch:
            self._recalibrate()

    def on_train_end(self, logs=None):
        self._recalibrate()

"""`call_with_grads`, kept for tests/test_ghost.py only: new tests call
`keras_bn._execution.run`, which this delegates to."""

from __future__ import annotations

from keras_bn import _execution


def call_with_grads(layer, x, upstream, training=True, mask=None):
    """Returns `(y, dx, {weight_name: grad})` for the trainable weights,
    from one eager call (see `_execution.run`)."""
    result = _execution.run(layer, x, training=training, mask=mask,
                            upstream=upstream)
    return result.outputs, result.dx, result.grads

"""Backend-specific gradients of a layer call, returned as NumPy arrays.

The layer is called once in a differentiable context; the loss is
`sum(outputs * upstream)`, so the gradients are vector-Jacobian products with
`upstream` (the `dy` of the paper's backward equations).
"""

from __future__ import annotations

import keras
import numpy as np


def call_with_grads(layer, x, upstream, training=True, mask=None):
    """Returns `(y, dx, {weight_name: grad})` for the trainable weights."""
    backend = keras.backend.backend()
    kwargs = {"training": training}
    if mask is not None:
        kwargs["mask"] = mask
    if not layer.built:
        layer.build(x.shape)
    weights = list(layer.trainable_weights)
    names = [w.name for w in weights]
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, **kwargs)
            loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
        grads = tape.gradient(loss, [xt] + [w.value for w in weights])
        grads = [None if g is None else g.numpy() for g in grads]
        y = y.numpy()
    elif backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, **kwargs)
        loss = (y.float() * torch.tensor(upstream)).sum()
        params = [w.value for w in weights]
        grads = torch.autograd.grad(loss, [xt] + params, allow_unused=True)
        grads = [None if g is None else g.detach().cpu().numpy() for g in grads]
        y = y.detach().cpu().numpy()
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [w.value for w in weights]
        non_trainable = [w.value for w in layer.non_trainable_weights]

        def loss_fn(xv, tv):
            y, new_nt = layer.stateless_call(
                tv, non_trainable, xv, return_losses=False, **kwargs
            )
            return jnp.sum(y.astype("float32") * upstream), (y, new_nt)

        (_, (y, new_nt)), grads = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(jnp.asarray(x), trainable)
        # Carry the state update over, as the other backends do.
        for var, value in zip(layer.non_trainable_weights, new_nt):
            var.assign(value)
        grads = [np.asarray(grads[0])] + [np.asarray(g) for g in grads[1]]
        y = np.asarray(y)
    else:  # pragma: no cover
        raise NotImplementedError(backend)
    return y, grads[0], dict(zip(names, grads[1:]))

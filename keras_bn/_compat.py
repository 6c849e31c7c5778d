"""Every name keras-bn takes from outside the libraries' public APIs.

Nothing else in the package touches a private Keras, TensorFlow or
PyTorch name: each one is reached through a function here, which says what
it is for. `tests/test_compat.py` checks every one of them on each backend
and fails with a message naming the entry when a library moves it.

Checked on Keras 3.15.1, TensorFlow 2.21.0, JAX 0.10.2 and
PyTorch 2.13.0.
"""

from __future__ import annotations

# The class `keras.models.clone_model` rebuilds for functional models;
# Keras exports no public name for it (keras.Model(...) returns one).
from keras.src.models.functional import Functional  # noqa: F401


def flatten_layers(layer, include_self: bool = True) -> list:
    """`layer` and every layer under it, recursively and without repeats:
    what `Model.layers` walks (`Layer._flatten_layers`), one level deeper
    than the public `layers` (it enters wrappers and subclassed layers)."""
    return list(layer._flatten_layers(include_self=include_self))


def reduction_axes(layer) -> tuple[int, ...]:
    """The axes a built batch-norm layer reduces over: ours keeps its own
    `_reduction_axes`; `keras.layers.BatchNormalization` sets the private
    attribute of the same name in `build`."""
    return tuple(layer._reduction_axes)


def shadow_call(layer, call) -> None:
    """Routes `layer.__call__` through `call` for this instance only:
    `Layer.__call__` looks `call` up on the instance, so an entry in its
    `__dict__` shadows the class's method. `unshadow_call` undoes it."""
    layer.__dict__["call"] = call


def unshadow_call(layer) -> None:
    layer.__dict__.pop("call", None)


def in_stateless_scope() -> bool:
    """Whether a `keras.StatelessScope` is active (`stateless_call`, Keras's
    JAX trainer): variable writes must then go through `assign`, which the
    scope collects. Keras exports the scope, not the query."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def variable_storage(variable):
    """The backend tensor a Keras variable holds (`Variable._value`; the
    public `value` may be a `StatelessScope`'s or an autocast copy)."""
    return variable._value


def tf_in_xla_context() -> bool:
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`) now.

    TensorFlow has no public query; where the private one is missing, this
    answers True, which makes callers take their XLA-safe path.
    """
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return True
    check = getattr(control_flow_util, "GraphOrParentsInXlaContext", None)
    return True if check is None else bool(
        check(tf.compat.v1.get_default_graph()))


def torch_version(tensor) -> int:
    """PyTorch's in-place version counter of `tensor` (`Tensor._version`):
    it changes whenever the tensor is written. Raises `RuntimeError` for
    inference-mode tensors, which keep none."""
    return tensor._version


def torch_batch_norm_update_stats(x, running_mean, running_var,
                                  momentum: float):
    """ATen's `batch_norm_update_stats`: per-channel mean and biased
    variance of `(N, C, ...)` data in one kernel, float32 for half inputs
    when the running buffers are float32 (not in `torch.nn.functional`)."""
    import torch

    return torch.batch_norm_update_stats(x, running_mean, running_var,
                                         momentum)


def torch_native_batch_norm_backward(*args):
    """ATen's `native_batch_norm_backward` (its per-channel sums of `dy`
    and `dy * (x - mean)`), which `torch.nn.functional` does not expose."""
    import torch

    return torch.ops.aten.native_batch_norm_backward(*args)

"""Running a layer on the current backend in each of its execution modes.

One harness for the tests and `benchmarks/bench_layer.py`: the same layer
call, with the same gradients and state handling, eagerly or under the
backend's compilers. Private: its interface may change with the tests.

Modes (`MODES[backend]`, `modes()` for the current backend):

- TensorFlow
  - `"eager"`: op by op, under a `tf.GradientTape`.
  - `"function"`: one `tf.function` (a graph, no XLA) that runs the call
    and its gradients.
  - `"xla"`: the same `tf.function` with `jit_compile=True`, as
    `model.fit` compiles its steps with `jit_compile=True`.
- JAX
  - `"eager"`: `layer.stateless_call` under `jax.vjp`, op by op.
  - `"jit"`: the same function under one `jax.jit`.
- PyTorch
  - `"eager"`: the layer's call, then `torch.autograd.grad`.
  - `"compile"`: the call under `torch.compile` with its defaults (the
    Inductor backend, graph breaks allowed, dynamic shapes as dynamo
    decides); the backward is AOTAutograd's. Dynamo may recompile for
    each new layer; the caller sizes `torch._dynamo.config.cache_size_limit`.

Gradients are vector-Jacobian products with `upstream` (the `dy` of the
paper's backward equations): the gradients of `sum(outputs * upstream)`,
with respect to the input and to every trainable weight. They are taken as
VJPs (`output_gradients=`, `jax.vjp`, `grad_outputs=`), so that a timed
step adds no loss computation to the layer's own. Training calls update the
layer's non-trainable weights (its moving statistics) on every backend: on
JAX the new values that `stateless_call` returns are carried from call to
call and written into the layer's variables by `Step.sync` (`run` does it),
as the other backends' calls assign them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

MODES = {
    "tensorflow": ("eager", "function", "xla"),
    "jax": ("eager", "jit"),
    "torch": ("eager", "compile"),
}


def modes() -> tuple[str, ...]:
    """The execution modes of the current Keras backend."""
    return MODES[keras.backend.backend()]


@dataclasses.dataclass
class Result:
    """One call's results, as NumPy arrays.

    Attributes:
        outputs: The layer's outputs (float16 and bfloat16 ones converted
            to float32, which is exact).
        dtype: The outputs' dtype as the layer produced them.
        dx: The gradient with respect to the input, or None (no gradient
            asked for, or an integer input).
        grads: `{name: gradient}` for every trainable weight (None where a
            weight does not enter the outputs).
        moving: `{name: value}` of every non-trainable weight after the
            call (the updated moving statistics after a training call).

    Weights are named by `name`, or by `path` where two of them share a
    name (a model with several batch-norm layers).
    """

    outputs: np.ndarray
    dtype: str
    dx: np.ndarray | None
    grads: dict[str, np.ndarray | None]
    moving: dict[str, np.ndarray]


class Step:
    """A zero-argument callable: one call of the layer, forward and (if
    asked) backward, waiting until the device is done. Returns
    `(outputs, dx, grads)` as backend tensors (`dx` and `grads` None
    without gradients).

    The state carries over from call to call as in a training loop (the
    moving statistics are updated every call). On TensorFlow and PyTorch
    each call assigns the layer's variables; on JAX the step holds the
    state from call to call (the trainable weights and the state are read
    from the layer when the step is built) and `sync()` writes it into the
    layer's variables.
    """

    def __init__(self, call: Callable[[], Any],
                 sync: Callable[[], None] | None = None,
                 lower: Callable[[], Any] | None = None):
        self._call = call
        self._sync = sync
        self._lower = lower

    def __call__(self):
        return self._call()

    def sync(self):
        """Writes the state that the calls carried into the layer's
        variables (JAX; elsewhere the calls assign them already)."""
        if self._sync is not None:
            self._sync()

    def lower(self):
        """JAX `"jit"` only: the `jax.stages.Lowered` of the step, for
        `.compile().memory_analysis()`."""
        if self._lower is None:
            raise ValueError("`lower` is for JAX's 'jit' mode only.")
        return self._lower()


def _check_mode(mode: str) -> str:
    backend = keras.backend.backend()
    if mode not in MODES[backend]:
        raise ValueError(f"`mode` must be one of {list(MODES[backend])} on "
                         f"{backend}. Received: mode={mode!r}")
    return backend


def step_fn(layer, x, mode: str = "eager", *, training: bool = True,
            grad: bool = True, upstream=None, mask=None,
            unknown_batch: bool = False) -> Step:
    """A `Step` that calls `layer` on `x` in `mode`, traced or compiled once.

    Args:
        layer: A Keras layer or model (built here on `x`'s shape if it is
            not built yet).
        x: The input (NumPy array or backend tensor, any dtype).
        mode: One of `modes()`.
        training: The layer's `training` argument.
        grad: Also take the gradients (the VJPs with `upstream`).
        upstream: The outputs' cotangent `dy` (cast to the outputs'
            dtype); None: ones, the gradients of `sum(outputs)`.
        mask: Passed to the layer as `mask` (None: no mask argument).
        unknown_batch: TensorFlow's `"function"` and `"xla"` only: trace
            with the leading axis unknown, as `model.fit` traces its step
            for a `tf.data` pipeline (elsewhere shapes are concrete).
    """
    backend = _check_mode(mode)
    if not layer.built:
        layer.build(tuple(x.shape))
    kwargs = {"training": training}
    if backend == "jax":
        return _jax_step(layer, x, mode, kwargs, grad, upstream, mask)
    params = [w.value for w in layer.trainable_weights]

    def forward(x, mask):
        extra = {} if mask is None else {"mask": mask}
        return layer(x, **kwargs, **extra)

    return function_step(forward, params, x, mode, grad=grad,
                         upstream=upstream, mask=mask,
                         unknown_batch=unknown_batch)


def function_step(forward, params, x, mode: str = "eager", *,
                  grad: bool = True, upstream=None, mask=None,
                  unknown_batch: bool = False) -> Step:
    """`step_fn` for a function `forward(x, mask)` whose trainable
    parameters `params` (backend variables or tensors) it reads itself:
    a kernel outside any Keras layer. TensorFlow and PyTorch only (JAX
    differentiates with respect to arguments: use `step_fn`)."""
    backend = _check_mode(mode)
    if backend == "tensorflow":
        return _tf_step(forward, params, x, mode, grad, upstream, mask,
                        unknown_batch)
    if backend == "torch":
        return _torch_step(forward, params, x, mode, grad, upstream, mask)
    raise NotImplementedError(
        "JAX differentiates with respect to arguments: use `step_fn`.")


def run(layer, x, *, mode: str = "eager", training: bool = True, mask=None,
        upstream=None, grad: bool = True,
        unknown_batch: bool = False) -> Result:
    """Calls `layer` on `x` once in `mode`; see `step_fn` for the arguments.

    In `"compile"` mode dynamo's caches are reset first, and a call that
    compiled no graph (ran eagerly) raises a RuntimeError.

    Returns:
        A `Result`: outputs, gradients and the non-trainable weights after
        the call, as NumPy arrays.
    """
    _check_mode(mode)
    if mode == "compile":
        import torch

        # Compiled afresh: dynamo's cache for the step's code would fill up
        # after a few layers and then run them eagerly, silently. (The
        # counters are dynamo's own statistics, a private name.)
        torch.compiler.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
    step = step_fn(layer, x, mode, training=training, grad=grad,
                   upstream=upstream, mask=mask, unknown_batch=unknown_batch)
    y, dx, grads = step()
    step.sync()
    if mode == "compile" and not counters["stats"]["unique_graphs"]:
        raise RuntimeError("torch.compile compiled no graph: the call ran "
                           "eagerly.")
    dtype = keras.backend.standardize_dtype(y.dtype)
    return Result(
        outputs=_numpy(y), dtype=dtype,
        dx=None if dx is None else _numpy(dx),
        grads=({} if grads is None else dict(zip(
            _names(layer.trainable_weights),
            [None if g is None else _numpy(g) for g in grads]))),
        moving=dict(zip(_names(layer.non_trainable_weights),
                        [_numpy(w.value) for w in layer.non_trainable_weights])),
    )


def _names(weights) -> list[str]:
    names = [w.name for w in weights]
    if len(set(names)) < len(names):
        names = [w.path for w in weights]
    return names


def _numpy(t) -> np.ndarray:
    dtype = keras.backend.standardize_dtype(t.dtype)
    if dtype in ("float16", "bfloat16"):
        t = keras.ops.cast(t, "float32")
    if keras.backend.backend() == "torch":
        return t.detach().cpu().numpy()
    return keras.ops.convert_to_numpy(t)


def _is_float(t) -> bool:
    return "float" in keras.backend.standardize_dtype(t.dtype)


# ------------------------------------------------------------- TensorFlow


def _tf_step(forward, params, x, mode, grad, upstream, mask, unknown_batch):
    import tensorflow as tf

    gpu = bool(tf.config.list_logical_devices("GPU"))
    x = tf.convert_to_tensor(x)
    up = None if upstream is None else tf.convert_to_tensor(upstream)
    mask = None if mask is None else tf.convert_to_tensor(mask)
    grad = grad and _is_float(x)

    # Only tensors go into the function (an input signature takes no None).
    tensors = [t for t in (x, up, mask) if t is not None]
    has_up, has_mask = up is not None, mask is not None

    def call(x, *rest):
        rest = list(rest)
        up = rest.pop(0) if has_up else None
        mask = rest.pop(0) if has_mask else None
        if not grad:
            return forward(x, mask)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x, mask)
        cotangent = tf.ones_like(y) if up is None else tf.cast(up, y.dtype)
        # The output is returned too: graph pruning would drop an unused
        # forward.
        return y, tape.gradient(y, [x] + params, output_gradients=cotangent)

    if mode != "eager":
        signature = None
        if unknown_batch:
            signature = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype)
                         for t in tensors]
        call = tf.function(_fixed_arity(call, len(tensors)),
                           jit_compile=mode == "xla",
                           input_signature=signature)

    def step():
        result = call(*tensors)
        if gpu:
            tf.test.experimental.sync_devices()
        if not grad:
            return result, None, None
        y, (dx, *grads) = result
        return y, dx, grads

    return Step(step)


def _fixed_arity(fn, n: int):
    """`fn(*args)` as a function of exactly `n` arguments: `tf.function`
    binds the arguments of a `*args` function more slowly, every call."""
    if n == 1:
        def one(a):
            return fn(a)
        return one
    if n == 2:
        def two(a, b):
            return fn(a, b)
        return two

    def three(a, b, c):
        return fn(a, b, c)
    return three


# ---------------------------------------------------------------- PyTorch


def _torch_step(forward, params, x, mode, grad, upstream, mask):
    import torch

    x = keras.ops.convert_to_tensor(x).detach()
    grad = grad and _is_float(x)
    if grad:
        x.requires_grad_(True)
    up = None if upstream is None else keras.ops.convert_to_tensor(upstream)
    if mask is not None:
        mask = keras.ops.convert_to_tensor(mask)
    if mode == "compile":
        forward = torch.compile(forward)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None

    def step():
        if not grad:
            with torch.no_grad():
                y = forward(x, mask)
            dx = grads = None
        else:
            y = forward(x, mask)
            cotangent = (torch.ones_like(y) if up is None
                         else up.to(y.dtype))
            dx, *grads = torch.autograd.grad(y, [x] + params,
                                             grad_outputs=cotangent,
                                             allow_unused=True)
        if sync is not None:
            sync()
        return y, dx, grads

    return Step(step)


# -------------------------------------------------------------------- JAX


def _jax_step(layer, x, mode, kwargs, grad, upstream, mask):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    up = None if upstream is None else jnp.asarray(upstream)
    mask = None if mask is None else jnp.asarray(mask)
    grad = grad and _is_float(x)
    non_trainable = list(layer.non_trainable_weights)

    def call(trainable, state, x, up, mask):
        extra = {} if mask is None else {"mask": mask}

        def f(trainable, x):
            return layer.stateless_call(trainable, state, x, **kwargs,
                                        **extra)

        if not grad:
            y, new_state = f(trainable, x)
            dx = grads = None
        else:
            y, vjp, new_state = jax.vjp(f, trainable, x, has_aux=True)
            cotangent = (jnp.ones_like(y) if up is None
                         else up.astype(y.dtype))
            grads, dx = vjp(cotangent)
        # The outputs are returned too: XLA would drop an unused forward.
        # Inference leaves the state as it was: not returned.
        return y, dx, grads, new_state if kwargs["training"] else None

    if mode == "jit":
        call = jax.jit(call)
    # Read once (a Keras variable's `value` costs microseconds a read);
    # the state then lives here from step to step, as in Keras's JAX
    # trainer, and `sync` writes it into the layer.
    trainable = [w.value for w in layer.trainable_weights]
    state = [[w.value for w in non_trainable]]

    def step():
        y, dx, grads, new_state = jax.block_until_ready(
            call(trainable, state[0], x, up, mask))
        if new_state is not None:
            state[0] = new_state
        return y, dx, grads

    def sync():
        for variable, value in zip(non_trainable, state[0]):
            variable.assign(value)

    return Step(step, sync=sync,
                lower=(lambda: call.lower(trainable, state[0], x, up, mask))
                if mode == "jit" else None)

"""Cost per call: how many ops one batch-norm call adds, ours against Keras's.

On small tensors (the articles' MNIST model: 128 x 128) the arithmetic is
tiny and a layer's cost is what it asks of the framework: the ops in the
traced TensorFlow graph, the equations in the jaxpr, the ATen dispatches in
eager PyTorch. This counts them for one training call (forward, with the
moving-statistics update), its backward, and one inference call, for
`keras_bn.BatchNormalization` and `keras.layers.BatchNormalization` on the
same input, and times the same calls round-robin.

- TensorFlow: operations in the `tf.function` graph of the call (training:
  forward plus `GradientTape` gradients w.r.t. the input, gamma and beta),
  traced for any batch size, as `model.fit` traces, and counted after
  Grappler, the graph the runtime runs (`step_ops.py` lists their types).
- JAX: equations in the jaxpr of `stateless_call` (and of its `jax.grad`),
  nested jaxprs (custom gradients, pjit) counted in full.
- PyTorch: ATen ops dispatched in eager mode, counted with a
  `TorchDispatchMode`; the backward counts what `loss.backward()` runs.

Rerun (writes benchmarks/results/bench_ops_<backend>.json and
benchmarks/results/bench_ops.md):

    nice python benchmarks/bench_ops.py
    python benchmarks/bench_ops.py --render
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import step_ops  # noqa: E402

SHAPES = {"dense_128x128": (128, 128), "conv_128x16x16x8": (128, 16, 16, 8)}
LAYERS = ("keras_bn", "keras")


def _layer(name, shape):
    import keras

    import keras_bn

    cls = (keras_bn.BatchNormalization if name == "keras_bn"
           else keras.layers.BatchNormalization)
    layer = cls()
    layer.build(shape)
    return layer


def _tf_counts(layer, x):
    import tensorflow as tf

    x = tf.constant(x)
    # Traced for any batch size, as `model.fit` traces its step on
    # TensorFlow (a tf.data pipeline's batches): the graph users run.
    function = functools.partial(tf.function, input_signature=[
        tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype)])

    @function
    def train(x):
        return layer(x, training=True)

    @function
    def train_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    @function
    def infer(x):
        return layer(x, training=False)

    def ops(fn):
        return step_ops.grappler_ops(fn.get_concrete_function())

    counts = {"train": ops(train), "train+grad": ops(train_grad),
              "infer": ops(infer)}
    counts["grad"] = counts["train+grad"] - counts["train"]
    return counts, {"train": lambda: train(x), "infer": lambda: infer(x),
                    "train+grad": lambda: train_grad(x)}


def _jaxpr_size(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    total += _jaxpr_size(sub)
    return total


def _jax_counts(layer, x):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    def train(tv, ntv, x):
        return layer.stateless_call(tv, ntv, x, training=True)

    def loss(tv, ntv, x):
        y, new = train(tv, ntv, x)
        return jnp.sum(y * y), new

    def infer(tv, ntv, x):
        return layer.stateless_call(tv, ntv, x, training=False)[0]

    grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
    counts = {
        "train": _jaxpr_size(jax.make_jaxpr(train)(tv, ntv, x).jaxpr),
        "train+grad": _jaxpr_size(jax.make_jaxpr(grad)(tv, ntv, x).jaxpr),
        "infer": _jaxpr_size(jax.make_jaxpr(infer)(tv, ntv, x).jaxpr),
    }
    counts["grad"] = counts["train+grad"] - counts["train"]
    jit = {name: jax.jit(fn) for name, fn in
           (("train", train), ("train+grad", grad), ("infer", infer))}

    def timed(fn):
        return lambda: jax.block_until_ready(fn(tv, ntv, x))

    return counts, {name: timed(fn) for name, fn in jit.items()}


def _torch_counts(layer, x):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    x = torch.as_tensor(x)

    def train():
        return layer(x, training=True)

    def train_grad():
        xg = x.detach().requires_grad_(True)
        y = layer(xg, training=True)
        (y * y).sum().backward()

    def infer():
        with torch.no_grad():
            return layer(x, training=False)

    counts = {}
    for name, fn in (("train", train), ("train+grad", train_grad),
                     ("infer", infer)):
        fn()  # first calls set up caches
        with Count() as c:
            fn()
        counts[name] = c.n
    counts["grad"] = counts["train+grad"] - counts["train"]
    return counts, {"train": train, "train+grad": train_grad, "infer": infer}


def counts_and_calls(backend: str, name: str, shape) -> tuple[dict, dict]:
    """`(op counts, zero-argument calls)` of one call of layer `name`
    (`LAYERS`) on a float32 input of `shape`: counts per call kind
    (`train`, `train+grad`, `infer`, and `grad` = their difference), and
    the same calls to time."""
    import keras
    import numpy as np

    counter = {"tensorflow": _tf_counts, "jax": _jax_counts,
               "torch": _torch_counts}[backend]
    x = np.random.default_rng(0).normal(2.0, 1.0, shape).astype("float32")
    keras.utils.set_random_seed(0)
    return counter(_layer(name, tuple(shape)), x)


def op_counts(backend: str, shape) -> dict:
    """`{layer name: op counts}` of one call on an input of `shape`, for
    each of `LAYERS` (see `counts_and_calls`)."""
    return {name: counts_and_calls(backend, name, shape)[0] for name in LAYERS}


def child(backend: str, repeats: int) -> dict:
    rows = []
    for shape_name, shape in SHAPES.items():
        fns, counts = {}, {}
        for name in LAYERS:
            counts[name], calls = counts_and_calls(backend, name, shape)
            fns.update({f"{name}/{k}": v for k, v in calls.items()})
        times = common.time_interleaved(fns, repeats=repeats, warmup=3)
        for kind in ("train", "train+grad", "infer"):
            row = {"shape": shape_name, "call": kind}
            for name in LAYERS:
                t = times[f"{name}/{kind}"]
                row[name] = {"ops": counts[name][kind],
                             "median_ms": t["median_ms"], "min_ms": t["min_ms"]}
            rows.append(row)
    return {"machine": common.machine(backend), "rows": rows}


def render(results: dict) -> str:
    header = ["backend", "shape", "call", "ops: ours / Keras's",
              "ms: ours / Keras's (median)", "time ratio (median; of min)"]
    table = []
    for backend, result in results.items():
        for row in result["rows"]:
            a, b = row["keras_bn"], row["keras"]
            table.append([
                backend, row["shape"], row["call"], f"{a['ops']} / {b['ops']}",
                f"{a['median_ms']:.3f} / {b['median_ms']:.3f}",
                f"{a['median_ms'] / b['median_ms']:.2f}; "
                f"{a['min_ms'] / b['min_ms']:.2f}",
            ])
    machine = next(iter(results.values()))["machine"]
    return "\n".join([
        "# Cost per call: ops and time, keras_bn vs keras.layers.BatchNormalization",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), keras "
        f"{machine.get('keras')}, commit {machine.get('git_commit')}. "
        "TensorFlow: `tf.function` graph ops; JAX: jaxpr equations (nested "
        "included), `jax.jit` timings; PyTorch: eager ATen dispatches. "
        "`train` is the forward call with the moving-statistics update; "
        "`train+grad` adds the gradients w.r.t. the input, gamma and beta.",
        "",
        common.markdown_table(header, table),
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(common.BACKENDS))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite bench_ops.md from the JSON files")
    args = parser.parse_args(argv)
    if args.child:
        common.quiet_logs()
        common.emit(child(args.child, args.repeats))
        return 0
    if not args.render:
        # The user's own OpenMP setting, as bench_models (see there).
        results = common.run_children(__file__, args.backends,
                                      ["--repeats", str(args.repeats)],
                                      user_openmp=True)
        for backend, result in results.items():
            common.write_results("bench_ops", backend, result)
    text = render(common.read_results("bench_ops"))
    (common.RESULTS / "bench_ops.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The small models' compiled training steps, timed directly: ours against
Keras's layer without `fit`'s per-epoch and per-step work around them.

For TensorFlow and JAX, builds `bench_models`' small models (the MNIST
dense variants and `tiny_conv`) with keras_bn's layer, Keras's layer (two
separately built models: the A/A control) and no BN, and times blocks of
`--block` calls of each model's compiled step on one batch, round-robin:

- TensorFlow: `model.train_function`, the `tf.function` that `fit` calls,
  reading a `tf.data` iterator that repeats the batch;
- JAX: `model.train_step` under `jax.jit` with its state donated, as
  `fit` compiles it, the block ending with `jax.block_until_ready`.

A round is one block per variant; the table gives each variant's median
and fastest microseconds per step over the rounds, and ours / Keras's of
both (with the A/A's beside it), and for JAX how many fusions each
compiled step holds (`jax_fusions`). This is what the layers cost inside the
step; `bench_models.py --small` measures the `fit` epochs the issue asks
about, where the set-up around the steps adds its own time and noise.

    nice python benchmarks/bench_steps.py [--rounds 30] [--block 50]

Writes benchmarks/results/bench_steps_<backend>.json and bench_steps.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BACKENDS = ("tensorflow", "jax")
VARIANTS = ("keras_bn", "keras", "keras_again", "no_bn")


def _tf_block(model, x, y, steps):
    """A call that runs `steps` of `model`'s compiled training step."""
    import tensorflow as tf

    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)  # traces
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    def block():
        for _ in range(steps):
            model.train_function(iterator)

    return block


def _jax_step(model, x, y):
    """`(step, state)`: `model.train_step` under `jax.jit` with its state
    donated, as `fit` compiles it, and the state it starts from."""
    import jax

    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)  # builds
    step = jax.jit(model.train_step, donate_argnums=0)
    state = tuple(tuple(v.value for v in group) for group in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    return step, state


def _jax_block(model, x, y, steps):
    """`_tf_block` under JAX: the jitted step threads its state, and the
    block waits for the last one (JAX dispatches asynchronously)."""
    import jax

    step, state = _jax_step(model, x, y)
    state = [state]

    def block():
        for _ in range(steps):
            state[0] = step(state[0], (x, y))[1]
        jax.block_until_ready(state[0])

    return block


def jax_fusions(model, x, y) -> int:
    """Fusions in the compiled step's entry computation: on XLA:CPU each
    runs as a kernel of its own (a loop or a YNNPACK call), so this is the
    step's kernel count; batch norm's share is the difference from the
    model without it."""
    step, state = _jax_step(model, x, y)
    text = step.lower(state, (x, y)).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    return len(re.findall(r"= \S+ fusion\(", entry))


def child(backend: str, args) -> dict:
    import keras
    import numpy as np

    import bench_models

    keras.utils.set_random_seed(0)
    make_block = {"tensorflow": _tf_block, "jax": _jax_block}[backend]
    rows = []
    for name in args.models:
        _, _, shape, batch, _ = bench_models.MODELS[name]
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, (batch,) + shape).astype("float32")
        y = rng.integers(0, 10, batch)
        fns = {variant: make_block(bench_models._build(name, variant, "auto"),
                                   x, y, args.block)
               for variant in VARIANTS}
        times = common.time_interleaved(fns, args.rounds, warmup=2)
        per_step = {v: {k: t[k] * 1e3 / args.block
                        for k in ("median_ms", "min_ms")}
                    for v, t in times.items()}
        row = {"model": name, "batch_size": batch, "us_per_step": per_step}
        if backend == "jax":
            row["fusions"] = {v: jax_fusions(
                bench_models._build(name, v, "auto"), x, y)
                for v in VARIANTS}
        rows.append(row)
        print(f"{backend} {name}: " + ", ".join(
            f"{v} {t['median_ms']:.0f}/{t['min_ms']:.0f} us"
            for v, t in per_step.items()), file=sys.stderr, flush=True)
    return {"machine": common.machine(backend), "rounds": args.rounds,
            "block": args.block, "rows": rows}


def render(results: dict) -> str:
    header = ["backend", "model", "µs per step: ours / Keras's / Keras's "
              "again / no BN (median)", "fastest", "ours / Keras's: median",
              "fastest", "A/A: median", "fastest",
              "XLA fusions in the step: ours / Keras's / Keras's again / no BN"]
    table, machines = [], []
    for backend, result in results.items():
        m = result["machine"]
        machines.append(
            f"- {backend}: {m['cpu']} ({m['cpu_count']} cores), keras "
            f"{m.get('keras')}, {backend} {m.get(backend)}, {m['date']}, "
            f"{result['rounds']} rounds of {result['block']} steps, commit "
            f"{m.get('git_commit')}.")
        for row in result["rows"]:
            t = row["us_per_step"]
            stats = ("median_ms", "min_ms")
            table.append([
                backend, row["model"],
                *(" / ".join(f"{t[v][k]:.0f}" for v in VARIANTS)
                  for k in stats),
                # ours / Keras's, then Keras's again / Keras's (A/A)
                *(f"{t[v][k] / t['keras'][k]:.3f}"
                  for v in ("keras_bn", "keras_again") for k in stats),
                " / ".join(str(row["fusions"][v]) for v in VARIANTS)
                if "fusions" in row else "-",
            ])
    return "\n".join([
        "# bench_steps results", "",
        "The small models' compiled training steps timed directly (no "
        "`fit` around them), in blocks of steps round-robin in one process "
        "per backend: ours, Keras's layer, Keras's layer in a second model "
        "(A/A: the resolution) and no BN. JAX rows count the fusions of "
        "each compiled step (XLA:CPU runs each as a kernel of its own). "
        "Regenerate with `nice python benchmarks/bench_steps.py`.", "",
        common.markdown_table(header, table), "", *machines, ""])


def main(argv=None) -> int:
    import bench_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--models", nargs="+",
                        default=list(bench_models.SMALL_MODELS),
                        choices=bench_models.SMALL_MODELS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.quiet_logs()
        common.emit(child(args.child, args))
        return 0
    results = common.run_children(
        __file__, args.backends,
        ["--models", *args.models, "--rounds", str(args.rounds),
         "--block", str(args.block)], user_openmp=True)
    for backend, result in results.items():
        common.write_results("bench_steps", backend, result)
    text = render(common.read_results("bench_steps", BACKENDS))
    (common.RESULTS / "bench_steps.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model-level benchmark: training throughput and the "BN tax".

For each backend (one child process each), trains the articles' models
(`keras_bn.models.cifar10_conv`, `keras_bn.models.mnist_dense`) with
`keras_bn.BatchNormalization` (default, and `fused=True`: the backends'
kernels as they are), with `keras.layers.BatchNormalization` and without
batch normalization, and reports samples per second and

    BN tax = 1 - throughput with BN / throughput without BN.

Training is `model.fit` with Keras's defaults (Adam, sparse categorical
cross-entropy, `jit_compile="auto"`: XLA under JAX, and under TensorFlow
only with a GPU; eager on PyTorch) on synthetic data (speed does not depend on the values: inputs in
[0, 1], random labels). Each measurement is one `fit` epoch of `--steps`
batches after a warm-up epoch that compiles; the variants run round-robin in
a random order each round and the median of `--repeats` rounds is reported.

With `--steady-malloc` the children keep freed memory (glibc tunables,
`common.STEADY_MALLOC`), as a caching allocator does; PyTorch's CPU steps
otherwise pay page faults on fresh activations and gradients.

Rerun (writes benchmarks/results/bench_models_<backend>.json and
benchmarks/results/bench_models.md):

    nice python benchmarks/bench_models.py
    nice python benchmarks/bench_models.py --backends torch --steady-malloc
    nice python benchmarks/bench_models.py --backends tensorflow --jit-compile false
    python benchmarks/bench_models.py --render
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {
    # name: (builder name, kwargs, input shape, batch size, steps)
    "cifar10_conv": ("cifar10_conv", {}, (32, 32, 3), 128, 30),
    "mnist_dense": ("mnist_dense", {"variant": "article3"}, (784,), 128, 200),
}
VARIANTS = ("keras_bn", "keras_bn_fused", "keras", "no_bn")
BN_VARIANTS = VARIANTS[:3]
TAX_TARGET = {"cifar10_conv": 0.15}


def _build(name, variant, jit_compile):
    import keras

    import keras_bn
    import keras_bn.models

    builder, kwargs, _, _, _ = MODELS[name]
    norm_layer = {
        "keras_bn": None,
        "keras_bn_fused": functools.partial(keras_bn.BatchNormalization,
                                            fused=True),
        "keras": keras.layers.BatchNormalization,
    }.get(variant)
    model = getattr(keras_bn.models, builder)(
        batch_norm=variant != "no_bn", norm_layer=norm_layer, **kwargs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    return model


def child(backend, args):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    rows = []
    for name in args.models:
        _, _, shape, batch, steps = MODELS[name]
        steps = args.steps or steps
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, (batch * steps,) + shape).astype("float32")
        y = rng.integers(0, 10, batch * steps)
        fns = {}
        for variant in VARIANTS:
            model = _build(name, variant, jit)
            model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch,
                      epochs=1, verbose=0)  # compiles

            def fit(model=model):
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                          shuffle=False)

            fns[variant] = fit
        times = common.time_interleaved(fns, args.repeats, warmup=1)
        samples = batch * steps
        throughput = {v: samples / (t["median_ms"] / 1e3)
                      for v, t in times.items()}
        tax = {v: 1.0 - throughput[v] / throughput["no_bn"]
               for v in BN_VARIANTS}
        # From each variant's fastest epoch: less sensitive to the load of
        # other processes on a shared machine.
        tax_of_min = {v: 1.0 - times["no_bn"]["min_ms"] / times[v]["min_ms"]
                      for v in BN_VARIANTS}
        rows.append({"model": name, "batch_size": batch, "steps": steps,
                     "times": times, "samples_per_s": throughput,
                     "bn_tax": tax, "bn_tax_of_min": tax_of_min})
        print(f"{backend} {name}: " + ", ".join(
            f"{v}={throughput[v]:.0f}/s" for v in VARIANTS)
            + "; BN tax " + ", ".join(f"{v}={tax[v]:.1%}" for v in BN_VARIANTS),
            file=sys.stderr, flush=True)
    return {"machine": common.machine(backend), "repeats": args.repeats,
            "jit_compile": args.jit_compile, "rows": rows}


def render(results_dir: Path) -> str:
    parts = ["# bench_models results", "",
             "Training throughput (samples/s, median) of the articles' "
             "models with keras_bn's layer, Keras's layer and without BN; "
             "BN tax = 1 - throughput with BN / without (medians; in "
             "parentheses, from each variant's fastest epoch, less sensitive "
             "to other processes' load). Target: BN tax of the CIFAR-10 "
             "model <= 15% with keras_bn. Regenerate with "
             "`nice python benchmarks/bench_models.py`.", ""]
    header = ["backend", "jit_compile", "malloc", "model", "batch x steps",
              "keras_bn /s", "keras_bn fused=True /s", "keras /s", "no BN /s",
              "BN tax keras_bn", "BN tax fused=True", "BN tax keras",
              "target"]
    rows, machines = [], []
    for backend in common.BACKENDS:
        for path in sorted(results_dir.glob(f"bench_models_{backend}*.json")):
            result = json.loads(path.read_text())
            m = result["machine"]
            machines.append(
                f"- {backend} ({path.name}): {m.get('device')} / {m['cpu']} "
                f"({m['cpu_count']} cores), keras {m.get('keras')}, "
                f"{backend} {m.get(backend)}, {m['date']}, median of "
                f"{result['repeats']}.")
            for row in result["rows"]:
                thr, tax = row["samples_per_s"], row["bn_tax"]
                tax_min = row.get("bn_tax_of_min", {})
                limit = TAX_TARGET.get(row["model"])
                target = "" if limit is None else (
                    f"<= {limit:.0%}: "
                    + ("met" if tax["keras_bn"] <= limit else "NOT met"))
                rows.append([
                    backend, result["jit_compile"],
                    "steady" if result.get("malloc") else "default",
                    row["model"],
                    f"{row['batch_size']} x {row['steps']}",
                    *(f"{thr[v]:.0f}" if v in thr else "-" for v in VARIANTS),
                    *(f"{tax[v]:.1%}" + (f" ({tax_min[v]:.1%})"
                                         if v in tax_min else "")
                      if v in tax else "-" for v in BN_VARIANTS),
                    target,
                ])
    parts += [common.markdown_table(header, rows), "", *machines, ""]
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(common.BACKENDS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0,
                        help="batches per timed epoch (default: per model)")
    parser.add_argument("--jit-compile", default="auto",
                        choices=("auto", "true", "false"))
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    common.add_steady_malloc_option(parser)
    parser.add_argument("--render", action="store_true",
                        help="only rebuild the markdown from the JSON files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]

    if args.child:
        common.quiet_logs()
        common.emit(child(args.child, args))
        return
    if not args.render:
        backends = [b for b in args.backends.split(",") if b]
        malloc, env, malloc_suffix = common.malloc_settings(args, backends)
        results = common.run_children(
            __file__, backends,
            ["--models", ",".join(args.models), "--repeats", str(args.repeats),
             "--steps", str(args.steps), "--jit-compile", args.jit_compile],
            env)
        for backend, result in results.items():
            result["malloc"] = malloc
            suffix = ("" if args.jit_compile == "auto" else
                      f"_jit_{args.jit_compile}") + malloc_suffix
            common.write_results("bench_models", backend + suffix, result,
                                 args.out)
    text = render(args.out)
    (args.out / "bench_models.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

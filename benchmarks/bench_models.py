"""Model-level benchmark: training throughput and the "BN tax".

For each backend and model (one child process each), trains the articles' models
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

The children run in the user's own OpenMP setting (`OMP_WAIT_POLICY`
unset unless this process sets it; recorded in each result's machine
info), not the tests' `PASSIVE`: with sleeping OpenMP threads every
parallel ATen kernel pays a wake-up, which makes small PyTorch steps 2-3x
slower and penalizes fused kernels against chains of small serial ops.
Measure on a quiet machine.

With `--steady-malloc` the children keep freed memory (glibc tunables,
`common.STEADY_MALLOC`), as a caching allocator does; PyTorch's CPU steps
otherwise pay page faults on fresh activations and gradients.

With `--fold` it measures inference instead: `model.predict` throughput
of `keras_bn.models.cifar10_conv()` and `keras.applications.MobileNetV2`
(`weights=None`, 96x96 inputs) with keras_bn's layer, with Keras's layer,
and after `keras_bn.fold` (batch norm merged into the convolutions);
the three run interleaved, and the ratios are of medians and of the
fastest runs (results: bench_models_fold_<backend>.json).

With `--small` it measures the small models, where a layer's cost is
mostly the ops it asks of the framework (issue 17: never slower than
Keras's layer): the three MNIST dense variants (`mnist_dense`'s article1,
article2, article3; batch 128 of 784 inputs) and `tiny_conv` (16x16x8
inputs, `Conv2D(8) -> BN -> ReLU -> GlobalAveragePooling2D -> Dense(10)`),
with keras_bn's layer, Keras's layer (twice: two separately built models,
the A/A control) and no BN, `--repeats` (default 7) interleaved `fit`
epochs each. Each row gives ours / Keras's epoch time of the medians and of
the fastest epochs, the same ratio of Keras's second model to its first
(what two equal layers read: the resolution), and the op counts of one BN call on
that model's BN input (`bench_ops.op_counts`: TF graph ops, jaxpr
equations, ATen dispatches; results: bench_models_small_<backend>.json).
Every run times each epoch twice: the `fit` call whole, and the epoch as
`fit` runs it (its begin to its end callback, `keras_bn.demo`'s timer),
which leaves out the call's own set-up and teardown: building the input
pipeline and, on TensorFlow, deleting the `tf.data` iterator, which now and
then blocks for about 250 ms (TF 2.21: one deletion in 3 to 5), so that such
calls last about 620 ms whatever the model. The table has a row for each.

With `--tf-dataset` (TensorFlow), `fit` reads a `tf.data.Dataset` built
once and cached instead of NumPy arrays: from arrays `fit` builds its input
pipeline afresh each epoch, copying the whole sample, which every variant
pays alike and which varies from epoch to epoch
(results: bench_models_small_tensorflow_tf_dataset.json).

Rerun (writes benchmarks/results/bench_models_<backend>.json and
benchmarks/results/bench_models.md):

    nice python benchmarks/bench_models.py
    nice python benchmarks/bench_models.py --small
    nice python benchmarks/bench_models.py --small --backends tensorflow --tf-dataset
    nice python benchmarks/bench_models.py --fold --backends tensorflow
    nice python benchmarks/bench_models.py --backends torch --steady-malloc
    nice python benchmarks/bench_models.py --backends tensorflow --jit-compile false
    python benchmarks/bench_models.py --render
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ops  # noqa: E402
import common  # noqa: E402

MODELS = {
    # name: (builder name, kwargs, input shape, batch size, steps)
    "cifar10_conv": ("cifar10_conv", {}, (32, 32, 3), 128, 30),
    "mnist_dense": ("mnist_dense", {"variant": "article3"}, (784,), 128, 200),
    # --small
    **{f"mnist_{v}": ("mnist_dense", {"variant": v}, (784,), 128, 200)
       for v in ("article1", "article2", "article3")},
    "tiny_conv": ("tiny_conv", {}, (16, 16, 8), 128, 100),
}
DEFAULT_MODELS = ("cifar10_conv", "mnist_dense")
SMALL_MODELS = ("mnist_article1", "mnist_article2", "mnist_article3",
                "tiny_conv")
VARIANTS = ("keras_bn", "keras_bn_fused", "keras", "no_bn")
# keras_again: a second, separately built model with Keras's layer. Its
# time / Keras's (an A/A comparison of two identical variants) is what
# ours / Keras's reads when the two layers cost the same: the resolution
# of the measurement on this machine.
SMALL_VARIANTS = ("keras_bn", "keras", "keras_again", "no_bn")
FOLD_MODELS = {
    # name: (input shape, batch size, batches per timed run)
    "cifar10_conv": ((32, 32, 3), 256, 8),
    "MobileNetV2": ((96, 96, 3), 32, 4),
}
FOLD_VARIANTS = ("keras_bn", "keras", "folded")
BN_VARIANTS = VARIANTS[:3]
TAX_TARGET = {"cifar10_conv": 0.15}
# --against: {commit: that commit's keras_bn, imported as keras_bn_<commit>}.
OLD = {}


def tiny_conv(batch_norm=True, norm_layer=None):
    """`Conv2D(8, 3, same) -> BN -> ReLU -> GlobalAveragePooling2D ->
    Dense(10, softmax)` on 16x16x8 inputs: BN on 128x16x16x8 per batch."""
    import keras
    from keras import layers

    import keras_bn

    blocks = [layers.Conv2D(8, 3, padding="same", name="conv")]
    if batch_norm:
        blocks.append((norm_layer or keras_bn.BatchNormalization)(
            name="batch_norm"))
    blocks += [layers.ReLU(name="relu"), layers.GlobalAveragePooling2D(
        name="pool"), layers.Dense(10, activation="softmax", name="output")]
    return keras.Sequential([keras.Input(MODELS["tiny_conv"][2]), *blocks],
                            name="tiny_conv" + ("_bn" if batch_norm else ""))


def _build(name, variant, jit_compile):
    import keras

    import keras_bn
    import keras_bn.models

    builder, kwargs, _, _, _ = MODELS[name]
    builder = (tiny_conv if builder == "tiny_conv"
               else getattr(keras_bn.models, builder))
    norm_layer = {
        **{f"keras_bn@{c}": m.BatchNormalization for c, m in OLD.items()},
        "keras_bn": None,
        "keras_bn_fused": functools.partial(keras_bn.BatchNormalization,
                                            fused=True),
        "keras": keras.layers.BatchNormalization,
        "keras_again": keras.layers.BatchNormalization,
    }.get(variant)
    model = builder(
        batch_norm=variant != "no_bn", norm_layer=norm_layer, **kwargs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    return model


def _bn_ops(backend, model, batch):
    """Op counts of one BN call (ours, Keras's) on each distinct BN input
    shape of `model`, with the number of BN layers of that shape."""
    import keras_bn

    shapes = [(batch, *layer.input.shape[1:]) for layer in model.layers
              if isinstance(layer, keras_bn.BatchNormalization)]
    return [{"shape": list(shape), "layers": shapes.count(shape),
             **bench_ops.op_counts(backend, shape)}
            for shape in dict.fromkeys(shapes)]


def child(backend, args):
    import keras
    import numpy as np

    from keras_bn import demo

    keras.utils.set_random_seed(0)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    variants = SMALL_VARIANTS if args.small else VARIANTS
    if args.against:
        OLD.update(common.import_old_packages(args.old_path, [args.against]))
        variants = (*variants, f"keras_bn@{args.against}")
    rows = []
    for name in args.models:
        _, _, shape, batch, steps = MODELS[name]
        steps = args.steps or steps
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, (batch * steps,) + shape).astype("float32")
        y = rng.integers(0, 10, batch * steps)
        data = _tf_dataset(x, y, batch) if args.tf_dataset else None
        fns, models, epochs = {}, {}, {}
        for variant in _build_order(variants, args.seed):
            model = models[variant] = _build(name, variant, jit)
            model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch,
                      epochs=1, verbose=0)  # compiles
            # The demo's epoch timer: each epoch as `fit` runs it (see the
            # module docstring), apart from the call's set-up and teardown.
            epochs[variant] = demo.Result(variant)
            timer = demo._EpochTimer(epochs[variant])

            def fit(model=model, timer=timer):
                if data is not None:
                    model.fit(data, epochs=1, verbose=0, callbacks=[timer])
                else:
                    model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                              shuffle=False, callbacks=[timer])

            fns[variant] = fit
        warmup = 1
        times = common.time_interleaved(fns, args.repeats, warmup=warmup,
                                        seed=args.seed)
        row = _row(name, batch, steps, times)
        row["epoch"] = _row(name, batch, steps, {
            v: common.timing_stats([1e3 * t for t in r.epoch_seconds[warmup:]])
            for v, r in epochs.items()})
        if args.small:
            row["bn_ops"] = _bn_ops(backend, models["keras_bn"], batch)
        rows.append(row)
        print(f"{backend} {name}: {_summary(row)}\n  epochs in fit: "
              f"{_summary(row['epoch'])}", file=sys.stderr, flush=True)
    return {"machine": common.machine(backend), "repeats": args.repeats,
            "jit_compile": args.jit_compile,
            "data": "tf.data" if args.tf_dataset else "numpy", "rows": rows}


def _tf_dataset(x, y, batch):
    """`--tf-dataset`: the batches as a `tf.data.Dataset` built once and
    cached in memory (read through once here), as a TensorFlow input
    pipeline feeds `fit`. From NumPy arrays `fit` builds its pipeline
    afresh each epoch, copying the whole sample (80-105 MB here): time
    and page faults that every variant pays alike and that vary from
    epoch to epoch."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()
    for _ in data:
        pass
    return data


def _build_order(variants, seed: int) -> list:
    """The order process `seed` builds the variants in: a different
    permutation for each of `len(variants)!` consecutive seeds, so that
    what the build order does to a model's speed (where its weights and
    buffers land in the heap) falls on every variant alike over the
    processes instead of on the first-built one each time."""
    orders = list(itertools.permutations(variants))
    return list(orders[seed % len(orders)])


def _row(name, batch, steps, times) -> dict:
    """A result row from `{variant: common.timing_stats}` of fit epochs."""
    bn_variants = [v for v in times if v != "no_bn"]
    samples = batch * steps
    throughput = {v: samples / (t["median_ms"] / 1e3)
                  for v, t in times.items()}
    row = {"model": name, "batch_size": batch, "steps": steps,
           "times": times, "samples_per_s": throughput,
           "bn_tax": {v: 1.0 - throughput[v] / throughput["no_bn"]
                      for v in bn_variants},
           # From each variant's fastest epoch: less sensitive to the load
           # of other processes on a shared machine.
           "bn_tax_of_min": {
               v: 1.0 - times["no_bn"]["min_ms"] / times[v]["min_ms"]
               for v in bn_variants}}
    for key, (name, is_other) in _OTHERS.items():
        other = next((v for v in times if is_other(v)), None)
        if other and name in times:
            row[key] = {
                stat: times[name][f"{stat}_ms"]
                / times[other][f"{stat}_ms"] for stat in ("median", "min")}
    return row


# Per row, one variant's epoch time / another's: ours / Keras's layer,
# with --against ours / the earlier commit's layer, and with --small the
# A/A control (Keras's layer / Keras's layer in a second model).
_OTHERS = {"vs_keras": ("keras_bn", lambda v: v == "keras"),
           "vs_old": ("keras_bn", lambda v: v.startswith("keras_bn@")),
           "a_a": ("keras_again", lambda v: v == "keras")}


def _summary(row) -> str:
    text = ", ".join(f"{v}={t:.0f}/s" for v, t in row["samples_per_s"].items())
    text += "; BN tax " + ", ".join(f"{v}={t:.1%}"
                                    for v, t in row["bn_tax"].items())
    if "vs_keras" in row:
        text += ("; time ours / Keras's: median {median:.3f}, best "
                 "{min:.3f}".format(**row["vs_keras"]))
    if "vs_old" in row:
        text += ("; ours / before: median {median:.3f}, best "
                 "{min:.3f}".format(**row["vs_old"]))
    if "a_a" in row:
        text += ("; A/A Keras's / Keras's: median {median:.3f}, best "
                 "{min:.3f}".format(**row["a_a"]))
    return text


def _pooled(rows) -> dict:
    """One row from the same model's rows of several processes.

    Times and throughputs pool every epoch of every process per variant.
    Ours / Keras's is the median over the processes of each process's own
    ratio (of its median and of its fastest epochs), all of them kept in
    `per_process_vs_keras`: the processes run at different speeds, and a
    ratio of pooled medians would compare epochs of different processes.
    """
    first = rows[0]
    times = {v: common.timing_stats(
        [ms for row in rows for ms in row["times"][v]["samples_ms"]])
        for v in first["times"]}
    row = _row(first["model"], first["batch_size"], first["steps"], times)
    if "bn_ops" in first:
        row["bn_ops"] = first["bn_ops"]
    if "epoch" in first:
        row["epoch"] = _pooled([r["epoch"] for r in rows])
    for key in _OTHERS:
        if key in row:
            row[f"per_process_{key}"] = [r[key] for r in rows]
            row[key] = {stat: statistics.median(r[key][stat] for r in rows)
                        for stat in ("median", "min")}
    return row


def _median_interval(values, level: float = 0.95, resamples: int = 10000):
    """A bootstrap interval of the median of `values` (per-process ratios):
    the range in which the median over processes would fall were the
    processes drawn again. Seeded, so that a rerendered table reads the
    same."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(0).choice(
        values, (resamples, len(values)))
    medians = np.median(draws, axis=1)
    tail = (1.0 - level) / 2.0
    return tuple(float(q) for q in np.quantile(medians, (tail, 1.0 - tail)))


def _verdict(interval) -> str:
    """What a ratio's interval says: ours faster or slower than Keras's
    layer only where the interval excludes 1."""
    low, high = interval
    if high < 1.0:
        return "faster"
    return "slower" if low > 1.0 else "no difference shown"


def _fold_models(name):
    """`{variant: model}` of one `FOLD_MODELS` entry, same weights."""
    import keras
    import numpy as np

    import keras_bn
    import keras_bn.models

    if name == "cifar10_conv":
        ours = keras_bn.models.cifar10_conv()
    else:
        ours = keras_bn.convert(keras.applications.MobileNetV2(
            weights=None, input_shape=FOLD_MODELS[name][0]))
    rng = np.random.default_rng(0)
    for layer in ours.layers:
        if isinstance(layer, keras_bn.BatchNormalization):
            for variable in (layer.moving_mean, layer.gamma, layer.beta):
                variable.assign(rng.uniform(-0.5, 0.5, variable.shape))
            layer.moving_variance.assign(
                rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    folded, report = keras_bn.fold(ours, return_report=True)
    models = {"keras_bn": ours,
              "keras": keras_bn.convert(ours,
                                        to=keras.layers.BatchNormalization),
              "folded": folded}
    return models, report


def fold_child(backend, args):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rows = []
    for name in args.models:
        shape, batch, steps = FOLD_MODELS[name]
        x = np.random.default_rng(0).uniform(
            0.0, 1.0, (batch * steps,) + shape).astype("float32")
        models, report = _fold_models(name)
        fns = {}
        for variant, model in models.items():
            model.predict(x[:batch], batch_size=batch, verbose=0)  # compiles

            def predict(model=model):
                model.predict(x, batch_size=batch, verbose=0)

            fns[variant] = predict
        times = common.time_interleaved(fns, args.repeats, warmup=1)
        samples = batch * steps
        throughput = {v: samples / (t["median_ms"] / 1e3)
                      for v, t in times.items()}
        speedup = {v: times[v]["median_ms"] / times["folded"]["median_ms"]
                   for v in FOLD_VARIANTS[:2]}
        speedup_of_min = {v: times[v]["min_ms"] / times["folded"]["min_ms"]
                          for v in FOLD_VARIANTS[:2]}
        expected = models["keras_bn"].predict(x[:batch], verbose=0)
        got = models["folded"].predict(x[:batch], verbose=0)
        rows.append({"model": name, "batch_size": batch, "steps": steps,
                     "times": times, "samples_per_s": throughput,
                     "folded_speedup": speedup,
                     "folded_speedup_of_min": speedup_of_min,
                     "bn_folded": len(report.folded),
                     "bn_total": len(report.folded) + len(report.not_folded),
                     "max_rel_diff": float(np.abs(got - expected).max()
                                           / np.abs(expected).max())})
        print(f"{backend} {name}: " + ", ".join(
            f"{v}={throughput[v]:.0f}/s" for v in FOLD_VARIANTS)
            + "; folded speed-up " + ", ".join(
                f"vs {v} {speedup[v]:.2f}x" for v in speedup),
            file=sys.stderr, flush=True)
    return {"machine": common.machine(backend), "repeats": args.repeats,
            "rows": rows}


def _machine_line(path: Path, result: dict, commit: bool = False) -> str:
    m = result["machine"]
    backend = m["backend"]
    return (f"- {backend} ({path.name}): {m.get('device')} / {m['cpu']} "
            f"({m['cpu_count']} cores), keras {m.get('keras')}, {backend} "
            f"{m.get(backend)}, {m['date']}, median of {result['repeats']}"
            + (f", commit {m.get('git_commit')}." if commit else "."))


def _result_files(results_dir: Path, kind: str) -> list[Path]:
    """The `bench_models_<kind>_<backend>*.json` files, in backend order."""
    return [p for b in common.BACKENDS
            for p in sorted(results_dir.glob(f"bench_models_{kind}_{b}*.json"))
            if "_against_" not in p.name]  # render_against


def render_fold(results_dir: Path) -> list[str]:
    paths = _result_files(results_dir, "fold")
    if not paths:
        return []
    parts = ["## Inference after `keras_bn.fold`", "",
             "`model.predict` throughput (samples/s, median) with keras_bn's "
             "layer, Keras's layer and folded (batch norm merged into the "
             "convolutions); speed-up of the folded model = time before / "
             "time after, of the medians (in parentheses, of the fastest "
             "runs). The CIFAR-10 model puts batch norm after the ReLU, as "
             "the article does: nothing folds, and its \"folded\" copy "
             "only swaps in Keras's layer. Regenerate with `nice python "
             "benchmarks/bench_models.py --fold`.", ""]
    header = ["backend", "model", "batch x steps", "keras_bn /s", "keras /s",
              "folded /s", "speed-up vs keras_bn", "speed-up vs keras",
              "BN folded", "max diff / output scale"]
    rows, machines = [], []
    for path in paths:
        result = json.loads(path.read_text())
        backend = result["machine"]["backend"]
        machines.append(_machine_line(path, result))
        for row in result["rows"]:
            thr = row["samples_per_s"]
            up, up_min = row["folded_speedup"], row["folded_speedup_of_min"]
            rows.append([
                backend, row["model"],
                f"{row['batch_size']} x {row['steps']}",
                *(f"{thr[v]:.0f}" for v in FOLD_VARIANTS),
                *(f"{up[v]:.2f}x ({up_min[v]:.2f}x)" for v in up),
                f"{row['bn_folded']} of {row['bn_total']}",
                f"{row['max_rel_diff']:.1e}",
            ])
    return parts + [common.markdown_table(header, rows), "", *machines, ""]


def render_small(results_dir: Path) -> list[str]:
    paths = _result_files(results_dir, "small")
    if not paths:
        return []
    parts = ["## Small models: ours against Keras's layer", "",
             "`fit` epochs of the MNIST dense models (article1: Dense(256) "
             "-> BN, article2: two Dense(64) -> BN, article3: Dense(128) -> "
             "BN) and of a tiny conv net (16x16x8 inputs, Conv2D(8) -> BN -> "
             "ReLU -> global average pooling -> Dense(10)), batch 128, "
             "keras_bn's layer, Keras's layer and no BN interleaved, in "
             "several fresh processes per model "
             "(each file's `processes`). Timed: each one-epoch `fit` call "
             "whole (`fit call`), and, in files from 2026-12-07 15:30 on, "
             "the epoch as `fit` runs it, from its begin to its end "
             "callback (`epoch in fit`: what each epoch of a multi-epoch "
             "`fit` costs, without the call's set-up and, on TensorFlow, "
             "the deletion of its tf.data iterator, which now and then "
             "blocks for about 250 ms). Epoch time ours / Keras's: within "
             "each process, of the medians and of the fastest epochs; the "
             "table gives the median over the processes of each (target: "
             "<= 1 on both), then every process's own median ratio, a "
             "95% bootstrap interval of the median over the processes, and "
             "what it shows (ours faster or slower only where the interval "
             "excludes 1); "
             "A/A: a second model with Keras's layer against the first, "
             "timed alike, the ratio that two layers of equal cost read "
             "here (the measurement's resolution; absent in older files); "
             "samples/s are of every epoch pooled. Data: NumPy arrays, "
             "which `fit` turns into a pipeline each epoch, or (TensorFlow, "
             "`--tf-dataset`) a tf.data.Dataset built once. Ops: one "
             "BN call on the model's BN input, ours / Keras's (TensorFlow: "
             "graph ops, JAX: jaxpr equations, PyTorch: ATen dispatches; "
             "see bench_ops.md). Regenerate with `nice python "
             "benchmarks/bench_models.py --small`.", ""]
    header = ["backend", "jit_compile", "malloc", "data", "model", "timed",
              "BN input", "batch x steps",
              "keras_bn /s", "keras /s", "keras again /s", "no BN /s",
              "time ours / Keras's: median", "best", "<= 1",
              "per process: median", "95% interval (median)", "shows",
              "A/A Keras's / Keras's: median",
              "best", "per process: median", "ops train", "ops train+grad",
              "ops infer"]
    rows, machines = [], []
    for path in paths:
        result = json.loads(path.read_text())
        backend = result["machine"]["backend"]
        machines.append(_machine_line(path, result, commit=True))
        for row in result["rows"]:
            ops = row["bn_ops"]
            setting = [backend, result["jit_compile"],
                       "steady" if result.get("malloc") else "default",
                       result.get("data", "numpy"), row["model"]]
            shape = [", ".join(f"{o['layers']} x "
                               + "x".join(str(d) for d in o["shape"])
                               for o in ops),
                     f"{row['batch_size']} x {row['steps']}"]
            op_cells = [", ".join(f"{o['keras_bn'][k]} / {o['keras'][k]}"
                                  for o in ops)
                        for k in ("train", "train+grad", "infer")]
            for timed, timing in (("fit call", row),
                                  ("epoch in fit", row.get("epoch"))):
                if timing is not None:
                    rows.append([*setting, timed, *shape,
                                 *_small_cells(timing), *op_cells])
    return parts + [common.markdown_table(header, rows), "", *machines, ""]


def _small_cells(row) -> list[str]:
    """Throughputs, ours / Keras's and the A/A of one timing of a row."""
    thr, ratio = row["samples_per_s"], row["vs_keras"]
    return [
        *(f"{thr[v]:.0f}" if v in thr else "-" for v in SMALL_VARIANTS),
        f"{ratio['median']:.3f}", f"{ratio['min']:.3f}",
        "yes" if max(ratio.values()) <= 1 else "NO",
        ", ".join(f"{r['median']:.2f}"
                  for r in row.get("per_process_vs_keras", [])),
        *((f"{interval[0]:.3f}-{interval[1]:.3f}", _verdict(interval))
          if (interval := _row_interval(row)) else ("-", "-")),
        *((f"{a_a['median']:.3f}", f"{a_a['min']:.3f}")
          if (a_a := row.get("a_a")) else ("-", "-")),
        ", ".join(f"{r['median']:.2f}"
                  for r in row.get("per_process_a_a", [])) or "-",
    ]


def _row_interval(row):
    """The bootstrap interval of a row's ours / Keras's (medians), from
    its processes' ratios (None for a single process)."""
    ratios = [r["median"] for r in row.get("per_process_vs_keras", [])]
    return _median_interval(ratios) if len(ratios) > 1 else None


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
            if "_against_" in path.name:
                continue  # render_against
            result = json.loads(path.read_text())
            machines.append(_machine_line(path, result))
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
    return "\n".join(parts + render_small(results_dir)
                     + render_against(results_dir) + render_fold(results_dir))


def render_against(results_dir: Path) -> list[str]:
    paths = [p for b in common.BACKENDS for p in sorted(
        results_dir.glob(f"bench_models*_{b}*_against_*.json"))]
    if not paths:
        return []
    parts = ["## Against an earlier commit", "",
             "`--against COMMIT`: that commit's layer (imported as "
             "`keras_bn_<commit>`) as one more variant in the same processes, "
             "its `fit` epochs interleaved with the others'. Epoch time ours / "
             "the earlier commit's: the median over the processes of each "
             "process's ratio of medians and of fastest epochs, then each "
             "process's own.", ""]
    header = ["backend", "model", "batch x steps", "commit", "keras_bn /s",
              "earlier /s", "ours / earlier: median", "best",
              "per process: median"]
    rows, machines = [], []
    for path in paths:
        result = json.loads(path.read_text())
        machines.append(_machine_line(path, result, commit=True))
        for row in result["rows"]:
            old = next(v for v in row["samples_per_s"]
                       if v.startswith("keras_bn@"))
            ratio = row["vs_old"]
            rows.append([
                result["machine"]["backend"], row["model"],
                f"{row['batch_size']} x {row['steps']}", old.split("@")[1],
                f"{row['samples_per_s']['keras_bn']:.0f}",
                f"{row['samples_per_s'][old]:.0f}",
                f"{ratio['median']:.3f}", f"{ratio['min']:.3f}",
                ", ".join(f"{r['median']:.2f}"
                          for r in row.get("per_process_vs_old", []))])
    return parts + [common.markdown_table(header, rows), "", *machines, ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(common.BACKENDS))
    parser.add_argument("--models", default=None,
                        help="default: DEFAULT_MODELS (SMALL_MODELS with "
                        "--small, FOLD_MODELS with --fold)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (default: 7 with --small, else 5)")
    parser.add_argument("--steps", type=int, default=0,
                        help="batches per timed epoch (default: per model)")
    parser.add_argument("--jit-compile", default="auto",
                        choices=("auto", "true", "false"))
    parser.add_argument("--processes", type=int, default=1,
                        help="child processes per backend and model, their "
                        "epochs pooled (not with --fold)")
    parser.add_argument("--seed", type=int, default=0,
                        help=argparse.SUPPRESS)  # a child's round order
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    common.add_steady_malloc_option(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fold", action="store_true",
                      help="inference before and after keras_bn.fold")
    mode.add_argument("--small", action="store_true",
                      help="the MNIST dense variants and a tiny conv net, "
                      "ours against Keras's layer, with op counts")
    parser.add_argument("--render", action="store_true",
                        help="only rebuild the markdown from the JSON files")
    parser.add_argument("--against", default=None, metavar="COMMIT",
                        help="also time that commit's layer, in the same "
                        "processes (results: ..._against_<commit>.json)")
    parser.add_argument("--tf-dataset", action="store_true",
                        help="TensorFlow: fit on a tf.data.Dataset built "
                        "once (results: ..._tf_dataset.json) instead of "
                        "NumPy arrays")
    parser.add_argument("--old-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in (args.models or ",".join(
        FOLD_MODELS if args.fold else SMALL_MODELS if args.small
        else DEFAULT_MODELS)).split(",") if m]
    if args.repeats is None:
        args.repeats = 7 if args.small else 5
    if args.fold and args.against:
        parser.error("--against times fit epochs; --fold cannot take it")
    if args.fold and args.processes != 1:
        parser.error("--processes pools fit epochs; --fold takes 1")
    if args.tf_dataset and not args.child and (
            args.fold or args.backends != "tensorflow"):
        parser.error("--tf-dataset feeds fit on TensorFlow alone: pass "
                     "--backends tensorflow (and not --fold); received "
                     f"--backends {args.backends}"
                     + (" --fold" if args.fold else ""))

    if args.child:
        common.quiet_logs()
        common.emit((fold_child if args.fold else child)(args.child, args))
        return
    if not args.render:
        backends = [b for b in args.backends.split(",") if b]
        malloc, env, malloc_suffix = common.malloc_settings(args, backends)
        against = []
        if args.against:
            against = ["--against", args.against, "--old-path",
                       str(common.old_packages([args.against]))]
        # One process per model: a process that has trained other models
        # runs the next one at a different speed (its heap, its threads),
        # and that falls unevenly on the variants (seen on PyTorch: 2.6x
        # slower epochs, ours/Keras's 1.25 after an earlier model against
        # 0.97 alone).
        # With --processes, several such processes per model, their epochs
        # pooled: each process settles into its own speed, and no one
        # process's state decides a ratio (each builds the variants in its
        # own order: `_build_order`).
        results, runs = {}, {}
        for model in args.models:
            for seed in range(args.processes):
                for backend, result in common.run_children(
                        __file__, backends,
                        ["--models", model, "--repeats", str(args.repeats),
                         "--steps", str(args.steps), "--jit-compile",
                         args.jit_compile, "--seed", str(seed),
                         *(["--fold"] if args.fold else []),
                         *(["--small"] if args.small else []),
                         *(["--tf-dataset"] if args.tf_dataset else []),
                         *against],
                        env, user_openmp=True).items():
                    results.setdefault(backend, {**result, "rows": []})
                    runs.setdefault((backend, model), []).extend(
                        result["rows"])
        for (backend, _), rows in runs.items():
            results[backend]["rows"].append(
                rows[0] if args.fold else _pooled(rows))
        for result in results.values():
            result["processes"] = args.processes
        for backend, result in results.items():
            if args.fold:
                common.write_results("bench_models_fold", backend, result,
                                     args.out)
                continue
            result["malloc"] = malloc
            suffix = ("" if args.jit_compile == "auto" else
                      f"_jit_{args.jit_compile}") + malloc_suffix + (
                "_tf_dataset" if args.tf_dataset else "") + (
                f"_against_{args.against}" if args.against else "")
            common.write_results(
                "bench_models_small" if args.small else "bench_models",
                backend + suffix, result, args.out)
    text = render(args.out)
    (args.out / "bench_models.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

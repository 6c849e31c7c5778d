"""Accuracy of the articles' models with keras_bn's BN, Keras's BN and no BN.

For each backend and dataset, trains the dataset's model (the MNIST dense
model of the Keras article, the CIFAR-10 conv model) with Adam, batch 128,
in the three variants of `keras_bn.demo`. To compare the layers rather
than the random draws, every backend and variant starts from the same
NumPy-drawn kernels (`demo.portable_init`) and sees the same batches in
the same order; only dropout masks (CIFAR-10) come from each backend's
generator. Adam's learning rate (1e-3) decays to 0 with a cosine schedule:
at a constant rate the held-out accuracy of a BN model moved by up to 12
points from one epoch to the next, which hid any difference between the
layers. Each
(backend, dataset) pair runs in its own process with `KERAS_BACKEND` set;
results are merged into `benchmarks/results/accuracy.json` (earlier pairs
are kept, so the benchmark can run in pieces) and the markdown table
`benchmarks/results/accuracy.md` is rewritten from the JSON.

Targets: keras_bn's layer is never below Keras's by more than noise (0.3
points on MNIST, 1 point on CIFAR-10), and the backends agree within the
same margins.

    KERAS_BN_DATA_DIR=/path/to/datasets python benchmarks/accuracy.py
    python benchmarks/accuracy.py --backends jax --datasets cifar10 \\
        --epochs 5 --train-size 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

JSON_PATH = common.RESULTS / "accuracy.json"
MD_PATH = common.RESULTS / "accuracy.md"
BACKENDS = common.BACKENDS
DATASETS = ("mnist", "cifar10")
MARGIN = {"mnist": 0.3, "cifar10": 1.0}  # accuracy points counted as noise


def _worker(dataset: str, epochs: int, batch_size: int,
            train_size: int | None, seed: int) -> dict:
    """Runs in a child process with KERAS_BACKEND set; returns one entry."""
    import keras

    from keras_bn import demo

    data = demo.load_data(dataset, train_size=train_size)
    entry = {
        "backend": keras.backend.backend(),
        "dataset": dataset,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": "Adam, learning rate 1e-3 cosine-decayed to 0",
        "protocol": "same NumPy-drawn initial kernels and batch order on "
                    "every backend and variant",
        "seed": seed,
        "train_examples": len(data[0][0]),
        "test_examples": len(data[1][0]),
        "data_source": os.environ.get("KERAS_BN_DATA_DIR")
        or "keras.datasets",
        "load_average_start": os.getloadavg(),
        "variants": {},
    }
    for variant in demo.VARIANTS:
        keras.utils.set_random_seed(seed)  # dropout masks
        model = demo.build_model(dataset, variant)
        demo.portable_init(model, seed)
        print(f"[{entry['backend']} {dataset}] {variant}", flush=True)
        result = demo.train(model, data, variant, epochs, batch_size,
                            verbose=2, cosine_decay=True, order_seed=seed)
        entry["variants"][variant] = demo.result_dict(result)
    entry["load_average_end"] = os.getloadavg()
    entry["machine"] = common.machine(entry["backend"])
    return entry


def _load() -> dict:
    if JSON_PATH.exists():
        return json.loads(JSON_PATH.read_text())
    return {"runs": {}}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _last(variant: dict, n: int = 3) -> list[float]:
    """Test accuracy (%) after each of the last `n` epochs."""
    return [100 * a for a in variant["history"]["val_accuracy"][-n:]]


def format_markdown(report: dict) -> str:
    """Per dataset: a row per backend with each variant's accuracy."""
    lines = [
        "# Accuracy: keras_bn vs keras.layers.BatchNormalization vs no BN",
        "",
        "Written by `benchmarks/accuracy.py` from `accuracy.json`. Test "
        "accuracy (%) after the last epoch. Every backend and variant starts "
        "from the same NumPy-drawn kernels and sees the same batches in the "
        "same order; Adam's learning rate (1e-3) decays to 0 on a cosine "
        "schedule. s/epoch: median training time of the epochs "
        "after the first, on a shared "
        f"{report.get('cpu_count', '?')}-core CPU where other jobs ran "
        "(indicative only). CIFAR-10 accuracy is on the data's `x_test`; "
        "from `cifar10.npz` in `KERAS_BN_DATA_DIR` that is a held-out split "
        "of the training set (its last 5,000 images), not the official test "
        "set.",
        "",
    ]
    runs = report["runs"]
    for dataset in DATASETS:
        rows = [runs[f"{b}/{dataset}"] for b in BACKENDS
                if f"{b}/{dataset}" in runs]
        if not rows:
            continue
        lines += [
            f"## {dataset}",
            "",
            "| backend | epochs | train / test examples | keras_bn | Keras "
            "| no BN | keras_bn - Keras | s/epoch keras_bn / Keras / no BN |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            v = r["variants"]
            acc = {k: 100 * v[k]["test_accuracy"] for k in v}
            sec = " / ".join(f"{v[k]['seconds_per_epoch']:.2f}" for k in v)
            lines.append(
                f"| {r['backend']} | {r['epochs']} | {r['train_examples']} / "
                f"{r['test_examples']} | {acc['keras_bn']:.2f} | "
                f"{acc['keras']:.2f} | {acc['none']:.2f} | "
                f"{acc['keras_bn'] - acc['keras']:+.2f} | {sec} |"
            )
        lines += [
            "",
            "Stability: final training loss, and test accuracy (%) after "
            "each of the last three epochs.",
            "",
            "| backend | train loss keras_bn / Keras / no BN "
            "| last 3 epochs keras_bn | last 3 epochs Keras |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            v = r["variants"]
            loss = " / ".join(f"{v[k]['history']['loss'][-1]:.4f}" for k in v)
            lines.append(
                f"| {r['backend']} | {loss} | "
                + " | ".join(", ".join(f"{a:.1f}" for a in _last(v[k]))
                             for k in ("keras_bn", "keras")) + " |"
            )
        final = {k: [100 * r["variants"][k]["test_accuracy"] for r in rows]
                 for k in ("keras_bn", "keras")}
        gap = min(o - k for o, k in zip(final["keras_bn"], final["keras"]))
        spread = {k: max(a) - min(a) for k, a in final.items()}
        swing = max(max(_last(r["variants"][k])) - min(_last(r["variants"][k]))
                    for r in rows for k in ("keras_bn", "keras"))
        margin = MARGIN[dataset]
        lines += [
            "",
            f"- keras_bn minus Keras, worst backend: {gap:+.2f} points "
            f"(target >= -{margin}): {_verdict(gap >= -margin)}.",
            f"- keras_bn across backends: spread {spread['keras_bn']:.2f} "
            f"points (target <= {margin}): "
            f"{_verdict(spread['keras_bn'] <= margin)}; Keras's layer: "
            f"{spread['keras']:.2f}.",
            f"- Noise: a BN model's test accuracy moved by up to {swing:.1f} "
            "points between its last three epochs.",
            "",
        ]
    return "\n".join(lines)


def _write_markdown(report: dict) -> None:
    markdown = format_markdown(report)
    MD_PATH.write_text(markdown + "\n")
    print(markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None,
                        help="first N training examples (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite accuracy.md from accuracy.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.emit(_worker(args.datasets, args.epochs, args.batch_size,
                            args.train_size, args.seed))
        return 0

    common.RESULTS.mkdir(parents=True, exist_ok=True)
    report = _load()
    if args.markdown_only:
        _write_markdown(report)
        return 0
    report["cpu_count"] = os.cpu_count()
    for backend in args.backends.split(","):
        for dataset in args.datasets.split(","):
            if backend not in BACKENDS or dataset not in DATASETS:
                parser.error(f"unknown backend/dataset {backend}/{dataset}")
            child_args = ["--datasets", dataset, "--epochs", str(args.epochs),
                          "--batch-size", str(args.batch_size),
                          "--seed", str(args.seed)]
            if args.train_size:
                child_args += ["--train-size", str(args.train_size)]
            start = time.time()
            entry = common.run_children(__file__, [backend], child_args,
                                        echo=True)[backend]
            entry["wall_seconds"] = round(time.time() - start, 1)
            entry["git"] = entry["machine"]["git_commit"]
            report["runs"][f"{backend}/{dataset}"] = entry
            JSON_PATH.write_text(json.dumps(report, indent=1))
            _write_markdown(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Precision of ours vs keras.layers.BatchNormalization on large-offset inputs.

For float32 inputs whose per-channel mean is `ratio` times their standard
deviation, prints the worst |std(output) - 1| over channels (NaN counted as
inf) for each backend, and writes benchmarks/results/numerics.json.

    python benchmarks/numerics.py            # all three backends
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RATIOS = (1e0, 1e2, 1e3, 1e4)


def measure() -> dict:
    import keras
    import numpy as np

    import keras_bn

    rng = np.random.default_rng(0)
    rows = {}
    for ratio in RATIOS:
        x = (rng.normal(size=(256, 16, 16, 4)) + ratio).astype("float32")
        row = {}
        for name, cls in (("keras_bn", keras_bn.BatchNormalization),
                          ("keras", keras.layers.BatchNormalization)):
            y = keras.ops.convert_to_numpy(cls(epsilon=1e-9)(x, training=True))
            std = y.reshape(-1, 4).astype(np.float64).std(axis=0)
            err = np.abs(std - 1.0)
            row[name] = float(np.max(np.where(np.isfinite(err), err, np.inf)))
        rows[f"{ratio:g}"] = row
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(common.BACKENDS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.quiet_logs()
        common.emit({"machine": common.machine(args.child),
                     "rows": measure()})
        return 0
    children = common.run_children(__file__, args.backends, [])
    results = {backend: r["rows"] for backend, r in children.items()}
    lines = ["| backend | mean/std | keras_bn: max abs(std - 1) | "
             "keras: max abs(std - 1) |", "|---|---|---|---|"]
    for backend, rows in results.items():
        for ratio, row in rows.items():
            lines.append(f"| {backend} | {ratio} | {row['keras_bn']:.1e} | "
                         f"{row['keras']:.1e} |")
    table = "\n".join(lines)
    print(table)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"what": __doc__.strip().splitlines()[0], "results": results,
               "machine": {b: r["machine"] for b, r in children.items()}}
    (common.RESULTS / "numerics.json").write_text(
        json.dumps(payload, indent=1) + "\n")
    (common.RESULTS / "numerics.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

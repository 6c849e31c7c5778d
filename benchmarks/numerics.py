"""Precision of ours vs keras.layers.BatchNormalization on large-offset inputs.

For float32 inputs whose per-channel mean is `ratio` times their standard
deviation, prints the worst |std(output) - 1| over channels (NaN counted as
inf) for each backend, and writes benchmarks/results/numerics.json.

    python benchmarks/numerics.py            # all three backends
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RATIOS = (1e0, 1e2, 1e3, 1e4)
HERE = os.path.dirname(os.path.abspath(__file__))


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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(measure()))
        return
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run([sys.executable, __file__, "--worker"], env=env,
                             capture_output=True, text=True, check=True)
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    lines = ["| backend | mean/std | keras_bn: max abs(std - 1) | keras: max abs(std - 1) |",
             "|---|---|---|---|"]
    for backend, rows in results.items():
        for ratio, row in rows.items():
            lines.append(f"| {backend} | {ratio} | {row['keras_bn']:.1e} | {row['keras']:.1e} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "numerics.json"), "w") as f:
        json.dump({"what": __doc__.strip().splitlines()[0], "results": results}, f, indent=1)
    with open(os.path.join(HERE, "results", "numerics.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()

"""`bench_layer` on an earlier commit and on the working tree, interleaved.

    python benchmarks/compare_commits.py --old 66919bf --rounds 3

Checks out `--old` in a `git worktree`, then runs one `bench_layer.py` (the
old commit's, unless `--script` says otherwise: a newer script may use
helpers the old package lacks) once per round, backend and side, with
`PYTHONPATH` choosing which `keras_bn` it imports. The two sides alternate,
and swap their order every round, so that drift in the machine's load
falls on both. Writes `results/compare_commits_<old>_<new>.json` and
`.md`: per row the summed medians of the rounds (new / old), the ratio of
the fastest calls, the old side's own spread between rounds (the noise
against which a difference has to be read), and new / old of the median
time relative to the native kernel timed in the same process, which
cancels what differs between processes (allocator state, thread
placement) but not what differs between the two commits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

VARIANTS = ("keras_bn", "keras_bn_fused")


def _run(script: Path, package: Path, out: Path, backend: str, args) -> None:
    env = dict(os.environ, PYTHONPATH=str(package))
    cmd = [sys.executable, str(script), "--no-memory", "--backends", backend,
           "--repeats", str(args.repeats), "--out", str(out)]
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    if args.dtypes:
        cmd += ["--dtypes", args.dtypes]
    if args.steady_malloc:
        cmd.append("--steady-malloc")
    print(f"--- {out.name} {backend}", flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def _rows(runs: Path, side: str, backend: str, suffix: str) -> dict:
    """{(shape, dtype, mode, variant): [(median_ms, min_ms, median_ms /
    native median_ms) per round]}."""
    rows = {}
    for folder in sorted(runs.glob(f"{side}_*")):
        path = folder / f"bench_layer_{backend}{suffix}.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["rows"]:
            for variant in VARIANTS:
                t = row["times"].get(variant)
                if t:
                    key = ("x".join(map(str, row["shape"])), row["dtype"],
                           row["mode"], variant)
                    native = row["times"].get("native")  # none on JAX
                    relative = (t["median_ms"] / native["median_ms"]
                                if native else None)
                    rows.setdefault(key, []).append(
                        (t["median_ms"], t["min_ms"], relative))
    return rows


def _relative(old, new) -> float | None:
    if any(r is None for *_, r in old + new):
        return None
    return (statistics.median(r for *_, r in new)
            / statistics.median(r for *_, r in old))


def summarize(runs: Path, backends, suffix: str) -> list[dict]:
    out = []
    for backend in backends:
        old = _rows(runs, "old", backend, suffix)
        new = _rows(runs, "new", backend, suffix)
        for key in old.keys() & new.keys():
            o, n = old[key], new[key]
            medians = [m for m, *_ in o]
            out.append({
                "backend": backend, "shape": key[0], "dtype": key[1],
                "mode": key[2], "variant": key[3],
                "old": o, "new": n,
                "median_ratio": sum(m for m, *_ in n) / sum(medians),
                "best_ratio": min(b for _, b, _ in n) / min(b for _, b, _ in o),
                "native_relative_ratio": _relative(o, n),
                "old_spread": max(medians) / min(medians),
            })
    out.sort(key=lambda r: (r["backend"], r["variant"], r["shape"],
                            r["dtype"], r["mode"]))
    return out


def render(rows: list[dict], title: str) -> str:
    table = common.markdown_table(
        ["backend", "variant", "shape", "dtype", "mode",
         "old medians (ms, per round)", "new medians", "new/old (summed "
         "medians)", "new/old (fastest)", "old's own spread",
         "new/old (relative to native, median)"],
        [[r["backend"], r["variant"], r["shape"], r["dtype"], r["mode"],
          " / ".join(f"{m:.2f}" for m, *_ in r["old"]),
          " / ".join(f"{m:.2f}" for m, *_ in r["new"]),
          f"{r['median_ratio']:.3f}", f"{r['best_ratio']:.3f}",
          f"{r['old_spread']:.2f}", common.fmt(r["native_relative_ratio"], ".3f")]
         for r in rows])
    return f"# {title}\n\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default=",".join(common.BACKENDS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", default=None)
    parser.add_argument("--dtypes", default=None)
    parser.add_argument("--script", type=Path, default=None,
                        help="bench_layer.py to run (default: the old "
                        "commit's)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="folder for the runs' JSON (default: a "
                        "temporary one); with --render, read it only")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--new-label", default=None,
                        help="the new side's name in the results (default: "
                        "the working tree's commit); with --render, the "
                        "commit the runs measured")
    common.add_steady_malloc_option(parser)
    args = parser.parse_args()
    backends = args.backends.split(",")
    suffix = "_steady_malloc" if args.steady_malloc else ""
    runs = args.runs or Path(tempfile.mkdtemp(prefix="compare_commits_"))
    old = subprocess.run(["git", "rev-parse", "--short", args.old],
                         cwd=common.REPO, check=True, text=True,
                         stdout=subprocess.PIPE).stdout.strip()
    new = args.new_label or common.git_state()
    if not args.render:
        tree = Path(tempfile.mkdtemp(prefix=f"keras_bn_{old}_"))
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), old],
                       cwd=common.REPO, check=True)
        try:
            script = args.script or tree / "benchmarks" / "bench_layer.py"
            sides = {"old": tree, "new": common.REPO}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for backend in backends:
                    for side in order:
                        _run(script, sides[side], runs / f"{side}_{r}",
                             backend, args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force",
                            str(tree)], cwd=common.REPO, check=False)
    rows = summarize(runs, backends, suffix)
    name = f"compare_commits_{old}_{new}{suffix}"
    title = (f"bench_layer: {old} (old) against {new} (new), "
             f"{args.rounds if not args.render else 'all'} interleaved rounds"
             f"{', steady malloc' if suffix else ''}")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": common.machine(), "old": old, "new": new, "rows": rows},
        indent=1) + "\n")
    text = render(rows, title)
    (common.RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

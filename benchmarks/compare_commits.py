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

With `--in-process` (`--old` may then name several commits, comma-
separated), all commits run in the same process instead: each old commit's
package is imported as `keras_bn_<commit>` (`common.old_packages`), and one child per round and backend times the old and new
layers, default and `fused=True`, round-robin with the native kernel
(`common.time_interleaved`), with the harness of the working tree's
`bench_layer`. What differs between processes then falls on every side
alike; the per-row figure is the median over rounds of each process's
new / old median (and of the fastest calls). Writes
`results/compare_commits_<old>[+<old>...]_<new>_in_process[_<backend>...]`
`.json` and `.md` (the backends named unless all ran).
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


# ------------------------------------------------------------ --in-process

def child_in_process(backend: str, args) -> dict:
    import bench_layer
    import keras_bn

    packages = common.import_old_packages(args.old_path, args.old.split(","))
    packages["new"] = keras_bn
    bk = bench_layer._make_backend(backend, argparse.Namespace(
        tf_xla=False, torch_compile=False))
    rows = []
    for shape in args.shape_list:
        for dtype in args.dtype_list:
            x, dy = bench_layer._inputs(bk, shape, dtype)
            policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
            steps = {}
            for side, package in packages.items():
                for variant in VARIANTS:
                    layer = package.BatchNormalization(
                        epsilon=bench_layer.EPSILON, dtype=policy,
                        fused=bench_layer.FUSED[variant])
                    steps[f"{side}:{variant}"] = bk.layer_steps(layer, x, dy)
            steps.update(bk.native_steps(x, dy))
            for mode, index in (("train", 0), ("infer", 1)):
                fns = {name: s[index] for name, s in steps.items()
                       if name != "native_layer"}
                times = common.time_interleaved(fns, args.repeats, 3)
                for t in times.values():
                    del t["samples_ms"]
                rows.append({"shape": "x".join(map(str, shape)),
                             "dtype": dtype, "mode": mode, "times": times})
                print(rows[-1], file=sys.stderr, flush=True)
            del steps
    return {"machine": common.machine(backend), "rows": rows}


def summarize_in_process(rounds: list[dict]) -> list[dict]:
    """Per old commit, row and variant: each round's new / old (medians and
    fastest), and their medians over the rounds."""
    out = {}
    for result in rounds:
        backend = result["machine"]["backend"]
        for row in result["rows"]:
            t = row["times"]
            olds = {name.split(":")[0] for name in t} - {"new", "native"}
            for variant, commit in ((v, c) for v in VARIANTS for c in olds):
                old, new = t[f"{commit}:{variant}"], t[f"new:{variant}"]
                key = (commit, backend, variant, row["shape"], row["dtype"],
                       row["mode"])
                entry = out.setdefault(key, {"median": [], "fastest": [],
                                             "new_ms": [], "native_ms": []})
                entry["median"].append(new["median_ms"] / old["median_ms"])
                entry["fastest"].append(new["min_ms"] / old["min_ms"])
                entry["new_ms"].append(new["median_ms"])
                if "native" in t:
                    entry["native_ms"].append(t["native"]["median_ms"])
    rows = []
    for key in sorted(out):
        e = out[key]
        rows.append(dict(zip(("old", "backend", "variant", "shape", "dtype",
                              "mode"), key),
                         median_ratios=e["median"], fastest_ratios=e["fastest"],
                         median_ratio=statistics.median(e["median"]),
                         fastest_ratio=statistics.median(e["fastest"]),
                         new_ms=statistics.median(e["new_ms"]),
                         native_ms=(statistics.median(e["native_ms"])
                                    if e["native_ms"] else None)))
    return rows


def render_in_process(rows: list[dict], title: str) -> str:
    parts = [f"# {title}", ""]
    for old in sorted({r["old"] for r in rows}):
        parts += _render_old(old, [r for r in rows if r["old"] == old])
    return "\n".join(parts)


def _render_old(old: str, rows: list[dict]) -> list[str]:
    table = common.markdown_table(
        ["backend", "variant", "shape", "dtype", "mode",
         "new/old of medians, per process", "median over processes",
         "new/old of fastest calls (median over processes)",
         "new median ms", "native median ms"],
        [[r["backend"], r["variant"], r["shape"], r["dtype"], r["mode"],
          " / ".join(f"{v:.3f}" for v in r["median_ratios"]),
          f"{r['median_ratio']:.3f}", f"{r['fastest_ratio']:.3f}",
          f"{r['new_ms']:.2f}", common.fmt(r["native_ms"], ".2f")]
         for r in rows])
    worst = max(rows, key=lambda r: r["median_ratio"])
    over = [r for r in rows if r["median_ratio"] > 1.05]
    return [f"## Against {old}", "",
            f"{len(over)} of {len(rows)} rows over 1.05 (median over "
            f"processes of new / old medians); the highest: "
            f"{worst['backend']} {worst['variant']} {worst['shape']} "
            f"{worst['dtype']} {worst['mode']} {worst['median_ratio']:.3f}.",
            "", table, ""]


def in_process(args, olds: list[str], new: str, backends) -> None:
    passthrough = ["--old", ",".join(olds), "--old-path",
                   str(common.old_packages(olds)), "--repeats",
                   str(args.repeats)]
    if args.shapes:
        passthrough += ["--shapes", args.shapes]
    if args.dtypes:
        passthrough += ["--dtypes", args.dtypes]
    malloc, env, suffix = common.malloc_settings(args, backends)
    rounds = []
    for _ in range(args.rounds):
        rounds += common.run_children(__file__, backends, passthrough,
                                      env).values()
    rows = summarize_in_process(rounds)
    name = f"compare_commits_{'+'.join(olds)}_{new}_in_process{suffix}"
    if tuple(backends) != common.BACKENDS:  # runs per backend keep their own
        name += "_" + "_".join(backends)
    title = (f"bench_layer in one process: {', '.join(olds)} (old) against "
             f"{new} (new), {args.rounds} processes per backend, "
             f"{args.repeats} interleaved calls each"
             f"{', steady malloc' if suffix else ''}")
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": common.machine(), "old": olds, "new": new,
         "malloc": malloc, "rounds": rounds, "rows": rows}, indent=1) + "\n")
    text = render_in_process(rows, title)
    (common.RESULTS / f"{name}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="the earlier commit (required)")
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
    parser.add_argument("--in-process", action="store_true",
                        help="both commits in one process (see above)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--old-path", type=Path, help=argparse.SUPPRESS)
    common.add_steady_malloc_option(parser)
    args = parser.parse_args()
    if args.child:
        import bench_layer

        args.shape_list = [tuple(int(d) for d in s.split(",")) for s in (
            args.shapes or ";".join(",".join(map(str, s))
                                    for s in bench_layer.SHAPES)).split(";")]
        args.dtype_list = (args.dtypes or ",".join(bench_layer.DTYPES)).split(",")
        common.quiet_logs()
        common.emit(child_in_process(args.child, args))
        return
    if not args.old:
        parser.error("--old is required")
    backends = args.backends.split(",")
    suffix = "_steady_malloc" if args.steady_malloc else ""
    runs = args.runs or Path(tempfile.mkdtemp(prefix="compare_commits_"))
    olds = [subprocess.run(["git", "rev-parse", "--short", commit],
                           cwd=common.REPO, check=True, text=True,
                           stdout=subprocess.PIPE).stdout.strip()
            for commit in args.old.split(",")]
    new = args.new_label or common.git_state()
    if args.in_process:
        in_process(args, olds, new, backends)
        return
    if len(olds) > 1:
        parser.error("several --old commits need --in-process")
    old = olds[0]
    if not args.render:
        with common.worktree(old) as tree:
            script = args.script or tree / "benchmarks" / "bench_layer.py"
            sides = {"old": tree, "new": common.REPO}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for backend in backends:
                    for side in order:
                        _run(script, sides[side], runs / f"{side}_{r}",
                             backend, args)
    rows = summarize(runs, backends, suffix)
    name = f"compare_commits_{old}_{new}{suffix}"
    title = (f"bench_layer: {old} (old) against {new} (new), "
             f"{args.rounds if not args.render else 'all'} interleaved rounds"
             f"{', steady malloc' if suffix else ''}")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": common.machine(), "old": olds, "new": new, "rows": rows},
        indent=1) + "\n")
    text = render(rows, title)
    (common.RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

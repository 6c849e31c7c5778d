"""Shared helpers for the benchmark scripts: timing, machine description,
per-backend child processes and result files.

The scripts run one child process per backend (the backend must be chosen
before keras is imported) and collect each child's JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Importing keras_bn imports Keras (and its backend): keep TensorFlow quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from keras_bn._processes import BACKENDS  # noqa: F401 (the benchmarks' default)
from keras_bn._processes import child_env

# --steady-malloc: glibc's allocator serves every block below 1 GiB from the
# heap and never trims it, so freed memory is reused without page faults, as
# with a caching allocator (CUDA's, jemalloc, tcmalloc). By default glibc
# maps blocks over its dynamic threshold (at most 32 MiB) afresh and unmaps
# them when freed: each fresh output then page-faults, ~0.5 ms a MiB in this
# VM, by amounts that change with the allocator's state.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                 "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def quiet_logs() -> None:
    """Silences TensorFlow's C++ logging; call before importing keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_children(script: str, backends, extra_args, extra_env=None,
                 echo: bool = False, user_openmp: bool = False) -> dict:
    """Runs `script --child` once per backend; returns {backend: result}.

    Each child prints its result as one JSON line prefixed by `RESULT `;
    with `echo`, its other output lines are shown as they come. With
    `user_openmp`, the child keeps this process's OpenMP wait policy (see
    `child_env`) instead of `PASSIVE`, which guards against neighbours but
    makes every parallel ATen kernel wake its threads.
    """
    out = {}
    for backend in backends:
        env = child_env(backend, (extra_env or {}).get(backend),
                        user_openmp=user_openmp)
        cmd = [sys.executable, script, "--child", backend, *extra_args]
        print(f"--- {backend}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                text=True)
        lines = []
        for line in proc.stdout:
            if line.startswith("RESULT "):
                lines.append(line)
            elif echo:
                print(line, end="", flush=True)
        if proc.wait() or not lines:
            raise RuntimeError(f"{backend} child failed (rc={proc.returncode})")
        out[backend] = json.loads(lines[-1][len("RESULT "):])
    return out


def add_steady_malloc_option(parser) -> None:
    parser.add_argument(
        "--steady-malloc", action="store_true",
        help="children keep freed memory (glibc tunables, see "
        "common.STEADY_MALLOC); results get a _steady_malloc suffix")


def malloc_settings(args, backends) -> tuple[dict, dict, str]:
    """`(tunables, extra_env per backend, result-name suffix)` for
    `--steady-malloc` (empty tunables and suffix without it)."""
    malloc = STEADY_MALLOC if args.steady_malloc else {}
    suffix = "_steady_malloc" if args.steady_malloc else ""
    return malloc, {b: malloc for b in backends}, suffix


def emit(result) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int,
                     warmup: int, seed: int = 0) -> dict[str, dict]:
    """Median/min/max milliseconds of each zero-argument callable, with
    every sample (`samples_ms`, for pooling runs: `timing_stats`).

    The callables run round-robin, in a new random order each round, so that
    drift in machine load (this CPU is shared) and the after-effects of the
    previous call (freed memory given back to the OS, caches) hit every
    candidate alike and their ratios stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: timing_stats(s) for name, s in samples.items()}


def timing_stats(samples_ms) -> dict:
    """`median_ms`, `min_ms`, `max_ms`, `n` and the samples themselves."""
    samples_ms = list(samples_ms)
    return {"median_ms": statistics.median(samples_ms),
            "min_ms": min(samples_ms), "max_ms": max(samples_ms),
            "n": len(samples_ms), "samples_ms": samples_ms}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


@contextlib.contextmanager
def worktree(commit: str):
    """A detached `git worktree` of `commit` (its path), removed after."""
    tree = Path(tempfile.mkdtemp(prefix=f"keras_bn_{commit}_"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                       cwd=REPO, check=False)


def old_packages(commits) -> Path:
    """A folder holding each commit's `keras_bn/` as `keras_bn_<commit>/`,
    every `keras_bn` name in it (imports, registered package, PyTorch
    operator namespace) rewritten, so that one process can import the old
    packages next to the working tree's (`import_old_packages`) and time
    them round-robin: what differs between processes then falls on every
    side alike."""
    folder = Path(tempfile.mkdtemp(prefix="keras_bn_old_")) / "packages"
    for commit in commits:
        with worktree(commit) as tree:
            name = f"keras_bn_{commit}"
            shutil.copytree(tree / "keras_bn", folder / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
            for path in (folder / name).rglob("*.py"):
                path.write_text(re.sub(r"\bkeras_bn\b", name,
                                       path.read_text()))
    return folder


def import_old_packages(folder: Path, commits) -> dict:
    """`{commit: module}` of `old_packages(commits)`'s packages."""
    import importlib

    sys.path.insert(0, str(folder))
    return {c: importlib.import_module(f"keras_bn_{c}") for c in commits}


def git_state() -> str | None:
    """HEAD's short commit, with `-dirty` if keras_bn/ or benchmarks/ have
    uncommitted changes (the code measured is then not the commit)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "keras_bn", "benchmarks/*.py"],
            cwd=REPO, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine(backend: str | None = None) -> dict:
    """What ran the benchmark: CPU, memory, library versions, accelerator."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "git_commit": git_state(),
        "argv": sys.argv,
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    if backend is None:
        return info
    import keras

    info["keras"] = keras.__version__
    info["backend"] = backend
    if backend == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        info["device"] = (
            tf.config.experimental.get_device_details(gpus[0]).get(
                "device_name", "GPU") if gpus else "cpu")
    elif backend == "jax":
        import jax

        info["jax"] = jax.__version__
        info["device"] = str(jax.devices()[0].device_kind)
    elif backend == "torch":
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = (torch.cuda.get_device_name(0)
                          if torch.cuda.is_available() else "cpu")
    return info


def write_results(name: str, backend: str, payload: dict,
                  out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{backend}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def read_results(name: str, backends=BACKENDS,
                 out_dir: Path = RESULTS) -> dict:
    """`{backend: result}` of the `<name>_<backend>.json` files there are
    (`write_results`' files), in the order of `backends`."""
    paths = {b: out_dir / f"{name}_{b}.json" for b in backends}
    return {b: json.loads(p.read_text()) for b, p in paths.items()
            if p.exists()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)

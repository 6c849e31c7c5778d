"""Running Python once per Keras backend, each run in a process of its own.

Keras fixes its backend when it is first imported, so whatever covers
several backends (the test runner, the benchmarks, the demo's `--backend`,
the notebooks' helpers, cross-backend tests) starts one child process per
backend. This module is the one place that names the backends and says how
such a child is started. It imports nothing from Keras.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

BACKENDS = ("tensorflow", "jax", "torch")


def child_env(backend: str, extra: Mapping[str, str] | None = None,
              base: Mapping[str, str] | None = None,
              user_openmp: bool = False) -> dict[str, str]:
    """The environment of a child process that runs Keras on `backend`.

    Args:
        backend: One of `BACKENDS`.
        extra: Variables to set on top (they win over the defaults).
        base: The environment to start from (default: this process's).
        user_openmp: Keep `base`'s OpenMP wait policy (a user's default:
            unset) instead of setting `PASSIVE`. For children that are
            timed or that stand for the user's own run (the demo, the
            benchmarks): with sleeping OpenMP threads every parallel ATen
            kernel pays a wake-up, which makes small PyTorch steps 1.5-3x
            slower and fused kernels slower than chains of small serial ops.

    Returns:
        A new dict, `base` with `KERAS_BACKEND` and quiet defaults set.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}. "
                         f"Received: backend={backend!r}")
    env = dict(os.environ if base is None else base, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # OpenMP threads that spin while waiting stall every parallel kernel
    # whenever another process holds the other core of a small machine (the
    # distributed tests' workers, a neighbouring job): torch then runs many
    # times slower. Sleeping waits keep each child about its own work.
    if not user_openmp:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


def run_python(backend: str, args: Sequence[str],
               extra_env: Mapping[str, str] | None = None,
               user_openmp: bool = False,
               **kwargs) -> subprocess.CompletedProcess:
    """`python *args` in a child process with Keras on `backend`.

    Args:
        backend: One of `BACKENDS`.
        args: Arguments after the interpreter (`["-m", "pytest", ...]`).
        extra_env: Extra environment variables for the child.
        user_openmp: See `child_env`.
        **kwargs: Passed to `subprocess.run` (`capture_output`, `cwd`, ...).

    Returns:
        The `subprocess.CompletedProcess`.
    """
    env = child_env(backend, extra_env, kwargs.pop("env", None), user_openmp)
    return subprocess.run([sys.executable, *args], env=env, **kwargs)

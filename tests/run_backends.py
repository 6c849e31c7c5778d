"""Runs the test suite once per Keras backend and fails if any backend fails.

Usage: python tests/run_backends.py [pytest arguments...]
(the whole of tests/ unless the arguments name test files or folders).
Each backend runs in its own process (KERAS_BACKEND is fixed at import).

KERAS_BN_TEST_JOBS backends run at once (default 2 on a machine of two or
more cores, else 1): much of a run is single-threaded (XLA and TensorFlow
compile the models of small tests one at a time), so a second backend
uses the core that the first leaves idle. The output stays in the order
of `BACKENDS` and each backend's block is whole: the first is printed as
it runs, a later one as soon as those before it are printed (what it
wrote meanwhile is held back until then).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

from keras_bn._processes import BACKENDS
from keras_bn._processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS_ENV = "KERAS_BN_TEST_JOBS"
# The slowest tests of each backend, in every CI log.
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "--durations=15")


def _count(pattern: str, text: str) -> int:
    match = re.search(rf"(\d+) {pattern}", text)
    return int(match.group(1)) if match else 0


def _targets(argv: list[str]) -> list[str]:
    """`["tests"]` unless the arguments name test files or folders."""
    named = any(os.path.exists(os.path.join(ROOT, a.split("::")[0]))
                for a in argv if not a.startswith("-"))
    return [] if named else ["tests"]


def _jobs() -> int:
    value = os.environ.get(JOBS_ENV, "")
    if not value:
        return 2 if (os.cpu_count() or 1) >= 2 else 1
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{JOBS_ENV} must be a positive integer, "
                         f"got {value!r}")
    return int(value)


class _Run:
    """One backend's pytest process; its output lines go to `lines`, then
    None once the process has ended (`code` and `seconds` are set by then)."""

    def __init__(self, backend: str, argv: list[str]):
        self.backend = backend
        self.cmd = [sys.executable, "-m", "pytest", *_targets(argv),
                    *PYTEST_ARGS, *argv]
        self.lines: queue.Queue = queue.Queue()
        self.proc = None
        self.code = None
        self.seconds = 0.0

    def start(self, done: threading.Semaphore) -> None:
        start = time.time()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=child_env(self.backend),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read():
            try:
                for line in self.proc.stdout:
                    self.lines.put(line)
                self.code = self.proc.wait()
                self.seconds = time.time() - start
            finally:
                self.lines.put(None)
                done.release()

        threading.Thread(target=read, daemon=True).start()


def _launch(runs: list[_Run], jobs: int, stop: threading.Event) -> None:
    """Starts the runs in order, at most `jobs` at a time."""
    slots = threading.Semaphore(jobs)
    for run in runs:
        slots.acquire()
        if stop.is_set():
            run.lines.put(None)
            continue
        try:
            run.start(slots)
        except OSError as e:  # no process: reported as a failed backend
            run.lines.put(f"could not start pytest: {e}\n")
            run.lines.put(None)
            slots.release()


def main(argv: list[str]) -> int:
    totals = {"passed": 0, "failed": 0, "errors": 0}
    failed_backends = []
    runs = [_Run(backend, argv) for backend in BACKENDS]
    jobs = _jobs()
    print(f"{len(runs)} backends, {jobs} at a time ({JOBS_ENV}={jobs})",
          flush=True)
    stop = threading.Event()
    launcher = threading.Thread(target=_launch, args=(runs, jobs, stop),
                                daemon=True)
    launcher.start()
    try:
        for run in runs:
            print(f"\n===== KERAS_BACKEND={run.backend} =====", flush=True)
            lines = []
            for line in iter(run.lines.get, None):
                print(line, end="", flush=True)
                lines.append(line)
            code = run.code if run.code is not None else 1
            summary = "".join(lines[-5:])
            totals["passed"] += _count("passed", summary)
            totals["failed"] += _count("failed", summary)
            totals["errors"] += _count("errors?", summary)
            print(f"===== {run.backend}: exit {code} in {run.seconds:.0f} s "
                  "=====", flush=True)
            if code != 0:
                failed_backends.append(run.backend)
    finally:
        stop.set()
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
    print("\nbackends failed: " + (", ".join(failed_backends) or "none"))
    bad = totals["failed"] + totals["errors"]
    if failed_backends and bad == 0:
        bad = len(failed_backends)  # a backend that crashed or collected nothing
    print(f"{totals['passed']} passed, {bad} failed")
    return 1 if failed_backends else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

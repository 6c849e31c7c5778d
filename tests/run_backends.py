"""Runs the test suite once per Keras backend and fails if any backend fails.

Usage: python tests/run_backends.py [pytest arguments...]
(the whole of tests/ unless the arguments name test files or folders).
Each backend runs in its own process (KERAS_BACKEND is fixed at import).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from keras_bn._processes import BACKENDS
from keras_bn._processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(pattern: str, text: str) -> int:
    match = re.search(rf"(\d+) {pattern}", text)
    return int(match.group(1)) if match else 0


def _targets(argv: list[str]) -> list[str]:
    """`["tests"]` unless the arguments name test files or folders."""
    named = any(os.path.exists(os.path.join(ROOT, a.split("::")[0]))
                for a in argv if not a.startswith("-"))
    return [] if named else ["tests"]


def main(argv: list[str]) -> int:
    totals = {"passed": 0, "failed": 0, "errors": 0}
    failed_backends = []
    for backend in BACKENDS:
        env = child_env(backend)
        start = time.time()
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *_targets(argv), "-q", "-p",
             "no:cacheprovider", *argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
        summary = "".join(lines[-5:])
        totals["passed"] += _count("passed", summary)
        totals["failed"] += _count("failed", summary)
        totals["errors"] += _count("errors?", summary)
        print(f"===== {backend}: exit {code} in {time.time() - start:.0f} s =====",
              flush=True)
        if code != 0:
            failed_backends.append(backend)
    print("\nbackends failed: " + (", ".join(failed_backends) or "none"))
    bad = totals["failed"] + totals["errors"]
    if failed_backends and bad == 0:
        bad = len(failed_backends)  # a backend that crashed or collected nothing
    print(f"{totals['passed']} passed, {bad} failed")
    return 1 if failed_backends else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# The layer benchmark on a CUDA machine, for when one is available.
#
# Needs CUDA builds of the backends in the active environment (e.g.
# `pip install -e ".[test]" "jax[cuda12]"` and a CUDA torch wheel); a backend
# that sees no GPU is skipped with a message. Steps, per backend:
#   1. the fast-path tests (tests/test_fused.py): cuDNN / CUDA kernels differ
#      from the CPU ones (reserve spaces, Welford sums), so the numerics are
#      rechecked on the device first;
#   2. benchmarks/bench_layer.py, writing JSON and bench_layer.md under
#      benchmarks/results/gpu/ (override with OUT=...).
# Usage: bash benchmarks/gpu.sh [extra bench_layer.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
export TF_CPP_MIN_LOG_LEVEL=3

has_gpu() {
  KERAS_BACKEND="$1" python - "$1" <<'PY'
import sys
backend = sys.argv[1]
if backend == "tensorflow":
    import tensorflow as tf
    ok = bool(tf.config.list_physical_devices("GPU"))
elif backend == "jax":
    import jax
    ok = jax.default_backend() == "gpu"
else:
    import torch
    ok = torch.cuda.is_available()
sys.exit(0 if ok else 1)
PY
}

backends=()
for b in tensorflow jax torch; do
  if has_gpu "$b" 2>/dev/null; then
    backends+=("$b")
  else
    echo "skipping $b: it sees no GPU" >&2
  fi
done
if [ ${#backends[@]} -eq 0 ]; then
  echo "no backend sees a GPU; nothing to do" >&2
  exit 1
fi

mkdir -p "$OUT"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || true

status=0
for b in "${backends[@]}"; do
  echo "=== tests/test_fused.py on $b (GPU)"
  # A failure is reported (and sets the exit status) but the benchmark
  # still runs: its numbers help to see what differs on the device.
  KERAS_BACKEND="$b" python -m pytest -q -p no:warnings tests/test_fused.py \
    2>&1 | tee "$OUT/test_fused_$b.txt" || status=1
done

list=$(IFS=,; echo "${backends[*]}")
python benchmarks/bench_layer.py --backends "$list" --repeats 20 \
  --out "$OUT" "$@"
exit $status

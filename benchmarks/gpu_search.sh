#!/usr/bin/env bash
# The digits search beside its full grid on a GPU: the samples ratio and the wall-clock ratio side by side.
#
#   benchmarks/gpu_search.sh [OUT_DIR]        # default ./gpu-search-out; WORKERS=4 cells at once on the GPU
#
# It runs benchmarks/bench_search.py --only digits, whose cells pick the GPU (critbatch train --device auto),
# and keeps its store and table in OUT_DIR. On a GPU the cells are short and a search's waves are few
# cells each, so the wall-clock ratio is expected above the samples ratio: a wave waits for its slowest
# cell, and the full grid keeps every worker busy. Written for a machine with a CUDA device; not run on
# the CPU-only development machines.
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-./gpu-search-out}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"

"$python" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_search.sh: torch sees no CUDA device")
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
PY

OMP_NUM_THREADS=1 "$python" benchmarks/bench_search.py --only digits --workers "${WORKERS:-4}" \
    --store "$out/store" | tee "$out/bench_search.txt"
grep '^problem digits:' "$out/bench_search.txt"

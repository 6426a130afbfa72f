#!/usr/bin/env bash
# The GPU checks, in one script for a lent GPU machine (about 8 minutes on one H100):
#   1. the CUDA tests (skipped on CPU machines);
#   2. the `gpu` suite: a 3-seed `--scale gpu --device cuda` comparison of the best STE, FOGZO, the
#      best HyperSTE, PEGE and PARQ on fashion-resnet (ResNet-20) and kjv-llama (10M tiny LLaMA),
#      written to docs/results/gpu/;
#   3. `metaste report`, which puts them in docs/results.md with the device named.
# On a CPU machine, try it at a tiny size (the CPU-scale tasks, 2 steps, 1 seed; writes under /tmp;
# ONLY=<id>,… runs only those comparisons of the suite):
#   DEVICE=cpu SCALE=cpu STEPS=2 SEEDS=1 OUT=/tmp/gpu DOC=/tmp/gpu/results.md README=/tmp/gpu/README.md \
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-4}
OUT=${OUT:-docs/results}
extra=()
[ -n "${STEPS:-}" ] && extra+=(--steps "$STEPS")
[ -n "${SCALE:-}" ] && extra+=(--scale "$SCALE")
[ -n "${SEEDS:-}" ] && extra+=(--seeds "$SEEDS")
[ -n "${ONLY:-}" ] && extra+=(--only "$ONLY")
export OMP_NUM_THREADS=1
if [ "$DEVICE" != cpu ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
  python -m pytest -q -rs $(grep -rl --include="*.py" "needs CUDA" tests)
fi
python -m metaste.bench.cli compare --suite gpu --device "$DEVICE" --workers "$WORKERS" --out "$OUT" "${extra[@]}"
python -m metaste.bench.cli report --results "$OUT" --doc "${DOC:-docs/results.md}" --readme "${README:-README.md}"

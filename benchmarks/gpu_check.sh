#!/usr/bin/env bash
# The GPU check of issue 15 goal 7: one short, prepared run for a machine with CUDA (target: a few minutes; at most
# 12 by the per-step limits; the device step allows for a cold first `import torch`, which loads the CUDA libraries
# from disk: over 30 s measured on a cold machine).
# Installs nothing: it needs only the README's set-up (.venv with the project installed). Steps, each under its
# own time limit, each printing its figures; a failing step is reported and the next one runs:
#   1. the device (nvidia-smi, torch's view of CUDA)
#   2. the GPU-marked tests (pytest -m gpu)
#   3. AMP training of every method (bf16 and fp16) for a few steps   (benchmarks/gpu_check.py amp)
#   4. ABMILX end to end with MRIS at 512 instances per step          (benchmarks/gpu_check.py e2e)
#   5. a DDP run on every visible GPU (torchrun, NCCL)                 (benchmarks/gpu_check.py ddp-setup + torchrun)
#   6. extraction patches/s, batched pipeline vs. naive loop           (benchmarks/bench_extract.py)
# Usage:
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu           # the same pieces on the CPU at small sizes (checks the script itself;
#                                           # AMP is ignored on CPU, DDP runs 2 gloo processes)
#   PY=/path/to/python benchmarks/gpu_check.sh   # another interpreter (default .venv/bin/python)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
export PYTHONWARNINGS=ignore
OUT=$(mktemp -d /tmp/gpu_check.XXXXXX)
FAILED=()
START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo
  echo "=== $name (limit ${limit}s)"
  timeout --signal=INT "$limit" "$@"
  local rc=$?
  echo "--- $name: exit $rc, $(($(date +%s) - t0)) s"
  [ $rc -eq 0 ] || FAILED+=("$name (exit $rc)")
}

if [ "$MODE" = gpu ]; then
  DEV=cuda
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NGPU" -ge 1 ] || { echo "no GPU visible (nvidia-smi -L lists none); use --cpu to check the script"; exit 2; }
  step "device" 120 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count(), torch.cuda.get_device_name(0))'"
  step "pytest -m gpu" 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
  step "AMP training, every method" 120 "$PY" benchmarks/gpu_check.py amp --device cuda
  step "ABMILX E2E, MRIS 512" 120 "$PY" benchmarks/gpu_check.py e2e --device cuda --n-samples 512
  "$PY" benchmarks/gpu_check.py ddp-setup "$OUT/ddp" --device cuda >/dev/null
  NPROC=$NGPU
  step "DDP, $NPROC GPU(s)" 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m wsimil_core train "$OUT/ddp/ddp.yaml"
  [ "$NPROC" -ge 2 ] || echo "note: one GPU, so torchrun ran a single process (no DistributedDataParallel wrapper)"
  step "extraction patches/s" 120 "$PY" benchmarks/bench_extract.py --devices cpu,cuda --patches 512 --batch-size 128 --workers 4 --trials 2
else
  step "device" 120 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'
  step "pytest -m gpu (skipped without CUDA)" 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
  step "AMP training, every method (CPU: amp ignored)" 600 "$PY" benchmarks/gpu_check.py amp --device cpu --amp bf16 --bags 4 --dim 32
  step "ABMILX E2E, MRIS (CPU, 16 instances)" 300 "$PY" benchmarks/gpu_check.py e2e --device cpu --amp off --n-samples 16 --input-size 32 --side 1024 --patch 128 --epochs 1 --workers 0
  "$PY" benchmarks/gpu_check.py ddp-setup "$OUT/ddp" --device cpu --amp off --bags 8 --dim 16 >/dev/null
  step "DDP, 2 gloo processes on CPU" 300 env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m wsimil_core train "$OUT/ddp/ddp.yaml"
  step "extraction patches/s (CPU)" 300 "$PY" benchmarks/bench_extract.py --devices cpu --patches 32 --batch-size 16 --workers 1 --trials 1
fi

echo
echo "=== total $(($(date +%s) - START)) s; outputs in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"

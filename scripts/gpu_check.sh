#!/usr/bin/env bash
# The device checks of a session that is lent a GPU, as one run (about 10 minutes on an H200):
# build relfast against the machine's own torch, run every CUDA test case, then the GPU
# benchmarks. Logs go to $OUT (the device tool's folder) or ./gpu-out.
#
#   bash scripts/gpu_check.sh            # build + CUDA tests + GPU benchmarks
#   bash scripts/gpu_check.sh tests      # build + CUDA tests only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RELFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; exit 1; }
"$PY" -c "import relfast; assert relfast.ops.built_with_cuda(), 'built without CUDA kernels'" || exit 1
echo "build: $(( $(date +%s) - start )) s"

# Every CUDA case (the parametrised ids name the device); files whose optional packages are
# missing on the machine are reported, not fatal.
timeout 360 "$PY" -m pytest tests -q -k "cuda" --continue-on-collection-errors -p no:cacheprovider -x \
  2>&1 | tee "$OUT/tests.log" | tail -n 40
[ "${1:-all}" = tests ] && exit 0

timeout 300 "$PY" -m pytest benchmarks --benchmark-only -q -k "cuda" -p no:cacheprovider \
  --benchmark-columns=min,median,rounds --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -n 80

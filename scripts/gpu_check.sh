#!/usr/bin/env bash
# One-shot GPU proof for a lent H200 (or any CUDA GPU): build with the machine's own torch,
# run the CUDA parity tests, every method + BiSup on the GPU, one 7B-shaped layer, the kernel
# benchmarks; leave JSON + logs in $OUT.
# Usage (device tool): bash scripts/gpu_check.sh        Budget: well under 8 minutes.
set -uo pipefail
OUT=${OUT:-$(pwd)/bench/results/gpu_check_local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step "build (sm_${TORCH_CUDA_ARCH_LIST})"
t0=$(date +%s)
if ! $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build took $(( $(date +%s) - t0 )) s"

step "CUDA parity tests"
# -k cuda: only the cuda-parametrized cases; the CPU ones already ran in CI.
timeout 240 $PY -m pytest -q -x tests/python -k "cuda" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25 || status=1

step "every method + BiSup on the GPU (tiny models of every family, bf16) and real-mode generation"
timeout 120 $PY scripts/gpu_models.py --device cuda 2>&1 | tee "$OUT/models_cuda.log" | tail -30 || status=1

step "one Llama-2-7B-shaped layer on the GPU: QuaRot+GPTQ and + BiSup (bench/scale.py)"
timeout 150 $PY bench/scale.py --device cuda --shapes llama2-7b --variants fp32_forward,base,bisup \
  --json "$OUT/scale_cuda.json" 2>&1 | tee "$OUT/scale_cuda.log" | tail -8 || status=1

step "benchmarks"
# Each bench writes its own JSON into $OUT and prints a table.
for bench in pack gemm attention hadamard; do
  if [ -f "bench/$bench.py" ]; then
    timeout 150 $PY "bench/$bench.py" --json "$OUT/bench_$bench.json" 2>&1 | tee "$OUT/bench_$bench.log" | tail -40 || status=1
  fi
done
exit $status

#!/usr/bin/env bash
# Serve a bisup compressed-tensors export with vLLM and compare perplexity with transformers +
# compressed-tensors (scripts/vllm_check.py). For a GPU machine with vLLM installed; not run by CI.
# Usage: bash scripts/vllm_check.sh EXPORT_DIR [extra vllm_check.py args]   (results in $OUT or .)
set -euo pipefail
EXPORT=${1:?usage: bash scripts/vllm_check.sh EXPORT_DIR [args]}
shift
OUT=${OUT:-.}
python3 -c "import vllm" 2>/dev/null || { echo "vllm_check: vLLM is not installed here"; exit 2; }
python3 scripts/vllm_check.py --export "$EXPORT" --json "$OUT/vllm_check.json" "$@"

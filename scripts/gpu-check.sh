#!/usr/bin/env bash
# The GPU check (issue 19): on a CUDA machine with torch (vLLM not needed), from the repository root.
# CUDA-graph replays of the bank's gather-add + o_proj at Llama-3-8B shapes against eager, the V1 row fill
# without a host sync, and the cost of the add against the attention block (decode 256, 4k prefill, bf16).
# Prints tables; writes gpu-check/results.json. A few minutes; no download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA device")'
# the checks import lofit's adapter format and bank (torch, safetensors); PYTHONPATH instead of an install
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m bench.gpu_check --out gpu-check/results.json "$@"

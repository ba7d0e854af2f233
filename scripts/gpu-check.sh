#!/usr/bin/env bash
# The GPU check (issue 19): on a CUDA machine with torch (vLLM not needed), from the repository root.
# CUDA-graph replays of the bank's gather-add + o_proj at Llama-3-8B shapes against eager, the V1 row fill
# without a host sync, and the cost of the add against the attention block (decode 256, 4k prefill, bf16).
# Where vLLM is installed (and the default model prepared by scripts/setup.sh), also the engine's start-up
# self-test in bf16 with CUDA graphs (it must see a FULL graph replay) and one fp32 fidelity batch against the
# transformers reference (python -m bench.gpu_check_vllm). Prints tables; writes gpu-check/results.json (and
# gpu-check/vllm.json). Where transformers and the default model are there, the trainer on CUDA too: stage 2 in
# bf16 on SmolLM2, its step time against a plain forward+backward (python -m bench.train_distributed --device
# cuda --ranks 1; gpu-check/train.json). A few minutes; no download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA device")'
# the checks import lofit's adapter format and bank (torch, safetensors); PYTHONPATH instead of an install
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
"$PY" -m bench.gpu_check --out gpu-check/results.json "$@" || status=1
if ! "$PY" -c 'import transformers' 2>/dev/null; then
    echo "gpu-check: transformers is not installed: the trainer check was not run"
elif [ ! -f "$("$PY" -m lofit.default_model path)/config.json" ]; then
    echo "gpu-check: the default model is not prepared (bash scripts/setup.sh): the trainer check was not run"
else
    "$PY" -m bench.train_distributed --device cuda --ranks 1 --dtype bfloat16 --pairs-per-rank 8 \
        --out gpu-check/train.json || status=1
fi
if ! "$PY" -c 'import vllm' 2>/dev/null; then
    echo "gpu-check: vLLM is not installed: the engine self-test and fidelity batch were not run"
elif [ ! -f "$("$PY" -m lofit.default_model path)/config.json" ]; then
    echo "gpu-check: the default model is not prepared (bash scripts/setup.sh): the vLLM checks were not run"
else
    "$PY" -m bench.gpu_check_vllm --out gpu-check/vllm.json || status=1
fi
exit $status

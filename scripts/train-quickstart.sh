#!/usr/bin/env bash
# Set up (idempotent), then train a short TruthfulQA adapter on the default model (about 4 minutes on 2 cores).
# Extra arguments go to lofit-train. To serve the result: lofit-serve --adapters-dir runs
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
MODEL="$(.venv/bin/python -m lofit.default_model path)"
OUT="${LOFIT_QUICKSTART_OUT:-runs/quickstart-truthfulqa}"
echo "[train] lofit-train on $MODEL -> $OUT (a short run: 64 pairs, 1 epoch per stage)"
exec .venv/bin/lofit-train --model "$MODEL" --task truthfulqa --fold 0 --heads-percent 3 \
    --epochs 1 --limit 64 --out "$OUT" "$@"

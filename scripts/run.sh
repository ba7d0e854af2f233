#!/usr/bin/env bash
# Quick start main job: set up (idempotent), then train a short TruthfulQA adapter on the default model.
# Until the server lands, this is the project's main job; extra arguments go to lofit-train.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
MODEL="$(.venv/bin/python -m lofit.models path)"
OUT="${LOFIT_QUICKSTART_OUT:-runs/quickstart-truthfulqa}"
echo "[run] lofit-train on $MODEL -> $OUT (a short run: 64 pairs, 1 epoch per stage)"
exec .venv/bin/lofit-train --model "$MODEL" --task truthfulqa --fold 0 --heads-percent 3 \
    --epochs 1 --limit 64 --out "$OUT" "$@"

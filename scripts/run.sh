#!/usr/bin/env bash
# Quick start main job: set up (idempotent), then serve the embedded SmolLM2-135M-Instruct with the shipped
# adapters on http://127.0.0.1:8000 (POST /generate, the OpenAI API under /v1, the schema at /docs).
# Extra arguments go to lofit-serve (e.g. --port 8080 --api-key KEY --admin-key KEY).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "[run] lofit-serve: the engine starts in 1-2 minutes on a CPU; it is ready when /ready answers 200"
exec .venv/bin/lofit-serve "$@"

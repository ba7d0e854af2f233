#!/usr/bin/env bash
# Set up (idempotent), lint and run the test suite; extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "[test] ruff check ."
.venv/bin/ruff check .
echo "[test] pytest -q $*"
# setup.sh prepared the default model: tests that need it must run, never skip (tests/conftest.py).
export LOFIT_REQUIRE_MODEL=1
# pytest exits 5 when no tests were collected; that is a failure too (set -e propagates it).
.venv/bin/python -m pytest -q "$@"

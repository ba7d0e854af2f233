#!/usr/bin/env bash
# Set up (idempotent), lint and run the test suite; extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
# Chromium from Debian's packages for the playground's browser tests (tests/server/test_playground.py); Playwright
# drives it, and never downloads a browser. Without apt-get or root those tests skip with a loud reason.
if [[ -z "${LOFIT_CHROMIUM:-}" ]] && ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [[ -z $SUDO ]] || sudo -n true 2>/dev/null; }; then
        echo "[test] apt-get install chromium (the playground's browser tests)"
        $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "[test] WARNING: chromium could not be installed: the playground's browser tests will be skipped"
    else
        echo "[test] WARNING: no chromium, and no apt-get with root: the playground's browser tests will be skipped"
    fi
fi
echo "[test] ruff check ."
.venv/bin/ruff check .
echo "[test] pytest -q $*"
# setup.sh prepared the default model: tests that need it must run, never skip (tests/conftest.py).
export LOFIT_REQUIRE_MODEL=1
# pytest exits 5 when no tests were collected; that is a failure too (set -e propagates it).
.venv/bin/python -m pytest -q "$@"

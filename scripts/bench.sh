#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md, in one run: heartbeat vs /livez throughput and latency,
# then resident memory per online device at 1,000,000 devices (1M users x 1 and 250k x 4).
#
# Usage: scripts/bench.sh [PORT]        (default port 18080; only ever talks to 127.0.0.1)
# Env:   SKIP_BUILD=1 to reuse target/release; SKIP_WRK=1 to skip the wrk cross-check;
#        MEMORY_ONLY=1 to run only the two memory fills; BIN_DIR (default ./target/release);
#        USERS, CONNECTIONS, DURATION, ROUNDS for the throughput runs (defaults 10000, 64, 10s, 3).
# The Redis Cluster, sharded-cluster and push benchmarks are in scripts/bench-cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PORT="${1:-18080}"
TARGET="http://127.0.0.1:${PORT}"
USERS="${USERS:-10000}"
CONNECTIONS="${CONNECTIONS:-64}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
BIN_DIR="${BIN_DIR:-./target/release}"
SERVER="$BIN_DIR/presence-service"
LOADGEN="$BIN_DIR/presence-loadgen"
PID=

if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --workspace --bins
fi

stop_server() {
  if [[ -n "$PID" ]]; then
    lib_stop_pids "$PID" || true
    PID=
  fi
}
trap stop_server EXIT

start_server() {
  stop_server
  lib_spawn - env PRESENCE_LISTEN="127.0.0.1:${PORT}" RUST_LOG=warn "$SERVER"
  PID=$LIB_PID
  lib_wait_http "${TARGET}/livez" 5 || lib_die "server did not start"
}

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# commit:  $(cat "$BIN_DIR/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "# load:    $(cat /proc/loadavg)"

if [[ -z "${MEMORY_ONLY:-}" ]]; then
echo "## throughput: livez, then (heartbeat, livez) x ROUNDS (presence-loadgen compare)"
start_server
"$LOADGEN" compare --target "$TARGET" --users "$USERS" --connections "$CONNECTIONS" \
  --duration "$DURATION" --rounds "$ROUNDS" --server-pid "$PID" 2>/dev/null

if [[ -z "${SKIP_WRK:-}" ]] && command -v wrk >/dev/null; then
  echo "## cross-check with wrk (same server, users still online): livez, heartbeat, livez"
  wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${TARGET}/livez" | grep -iE 'requests/sec|99%|non-2xx|socket errors'
  USERS="$USERS" wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -s docs/wrk-heartbeat.lua "$TARGET" \
    | grep -iE 'requests/sec|99%|non-2xx|socket errors'
  wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${TARGET}/livez" | grep -iE 'requests/sec|99%|non-2xx|socket errors'
fi
fi

echo "## memory: 1,000,000 users x 1 device"
start_server
"$LOADGEN" fill --target "$TARGET" --users 1000000 --devices-per-user 1 --connections 64 \
  --server-pid "$PID" 2>/dev/null

echo "## memory: 250,000 users x 4 devices"
start_server
"$LOADGEN" fill --target "$TARGET" --users 250000 --devices-per-user 4 --connections 64 \
  --server-pid "$PID" 2>/dev/null
stop_server

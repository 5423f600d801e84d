#!/usr/bin/env bash
# Issue 12: the cost of privacy rules. For each round, on a fresh server each time, with rules
# off and then on every user (presence-loadgen --privacy rules, see loadgen/src/rules.rs):
#   batch  POST /status/batch of BATCH users read as a viewer (X-Presence-Viewer): rps and p99;
#   push   SIM_USERS WebSockets with SIM_SUBS subscriptions each, SIM_CHANGES status changes/s
#          for SIM_DURATION: delivery delay p50/p99 and delivered/expected; then, rules on,
#          SETTINGS_CHANGES settings changes/s (deny a watcher, lift it) for SETTINGS_DURATION:
#          how fast the watcher gets the OFFLINE view and then the real one.
# It prints one line per run and the on/off ratios per round.
#
# Usage: scripts/bench-privacy.sh [SERVER_BIN]      (default target/release/presence-service)
# Env:   LOADGEN (default target/release/presence-loadgen), PORT (default 18320),
#        USERS (10000), BATCH (100), CONNECTIONS (32), DURATION (10s), ROUNDS (2),
#        SIM_USERS (5000), SIM_SUBS (20), SIM_CHANGES (100), SIM_DURATION (30s),
#        SETTINGS_CHANGES (20), SETTINGS_DURATION (20s), PARTS (batch,push), OUT (JSON lines).
# The server runs all-in-one on its embedded store. Only ever talks to 127.0.0.1; stops the
# server it started.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

SERVER="${1:-target/release/presence-service}"
LOADGEN="${LOADGEN:-target/release/presence-loadgen}"
PORT="${PORT:-18320}"
USERS="${USERS:-10000}"
BATCH="${BATCH:-100}"
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-2}"
SIM_USERS="${SIM_USERS:-5000}"
SIM_SUBS="${SIM_SUBS:-20}"
SIM_CHANGES="${SIM_CHANGES:-100}"
SIM_DURATION="${SIM_DURATION:-30s}"
SETTINGS_CHANGES="${SETTINGS_CHANGES:-20}"
SETTINGS_DURATION="${SETTINGS_DURATION:-20s}"
PARTS="${PARTS:-batch,push}"
OUT="${OUT:-/dev/null}"
TARGET="http://127.0.0.1:${PORT}"
[[ -x "$SERVER" && -x "$LOADGEN" ]] ||
  lib_die "build first: cargo build --release --bin presence-service -p presence-loadgen"
PID=

stop_server() {
  if [[ -n "$PID" ]]; then
    lib_stop_pids "$PID" || true
    PID=
  fi
}
trap stop_server EXIT

start_server() {
  stop_server
  lib_spawn "${LOG:-/dev/null}" env PRESENCE_LISTEN="127.0.0.1:${PORT}" RUST_LOG=warn "$SERVER"
  PID=$LIB_PID
  lib_wait_http "${TARGET}/livez" 10 || lib_die "server did not start"
}

# batch PRIVACY: prints "rps p99_ms errors server_cpu_us_per_request"
batch() {
  start_server
  "$LOADGEN" --format json http --mode batch --privacy "$1" --target "$TARGET" \
    --users "$USERS" --batch-size "$BATCH" --connections "$CONNECTIONS" \
    --duration "$DURATION" --server-pid "$PID" 2>/dev/null | tail -n 1 | tee -a "$OUT" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["rps"]), r["latency_ms"]["p99"], r["errors"], r["server_cpu_us_per_req"])'
  stop_server
}

# push PRIVACY SETTINGS_CHANGES: prints "p50_ms p99_ms delivered/expected false_offlines
# settings_p50_ms settings_p99_ms settings_delivered/settings_changes"
push() {
  start_server
  "$LOADGEN" --format json sim --transport ws --target "$TARGET" --users "$SIM_USERS" \
    --devices 1 --subscriptions "$SIM_SUBS" --interval 30s --duration "$SIM_DURATION" \
    --changes "$SIM_CHANGES" --privacy "$1" --settings-changes "$2" \
    --settings-duration "$SETTINGS_DURATION" --first-user 7000000000 2>/dev/null |
    tail -n 1 | tee -a "$OUT" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["delay_ms_p50"], r["delay_ms_p99"], "%d/%d" % (r["delivered"], r["expected"]), r["false_offlines"], r["settings_delay_ms_p50"], r["settings_delay_ms_p99"], "%d/%d" % (r["settings_delivered"], r["settings_changes"]))'
  stop_server
}

ratio() { python3 -c "import sys; print(f'{float(sys.argv[2]) / float(sys.argv[1]):.2f}')" "$1" "$2"; }

echo "# machine: $(nproc) cores; load: $(cat /proc/loadavg); commit $(git rev-parse --short HEAD)"
for round in $(seq 1 "$ROUNDS"); do
  if [[ ",$PARTS," == *,batch,* ]]; then
    off="$(batch off)"
    on="$(batch rules)"
    echo "round$round batch off   rps p99_ms errors cpu_us/req: $off"
    echo "round$round batch rules rps p99_ms errors cpu_us/req: $on"
    echo "round$round batch rules/off: p99 $(ratio "$(cut -d' ' -f2 <<<"$off")" "$(cut -d' ' -f2 <<<"$on")")" \
      "rps $(ratio "$(cut -d' ' -f1 <<<"$off")" "$(cut -d' ' -f1 <<<"$on")")" \
      "cpu/req $(ratio "$(cut -d' ' -f4 <<<"$off")" "$(cut -d' ' -f4 <<<"$on")")"
  fi
  if [[ ",$PARTS," == *,push,* ]]; then
    off="$(push off 0)"
    on="$(push rules "$SETTINGS_CHANGES")"
    echo "round$round push  off   p50 p99 delivered false_offlines: $off"
    echo "round$round push  rules p50 p99 delivered false_offlines settings_p50 settings_p99 settings_delivered: $on"
    echo "round$round push  rules/off: p50 $(ratio "$(cut -d' ' -f1 <<<"$off")" "$(cut -d' ' -f1 <<<"$on")")" \
      "p99 $(ratio "$(cut -d' ' -f2 <<<"$off")" "$(cut -d' ' -f2 <<<"$on")")"
  fi
done

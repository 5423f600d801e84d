#!/usr/bin/env bash
# Issue 13: durable changes (`POST /online` of a device that changes platform each time: a
# visible change, written through to the store) on the memory store and on the Redis Cluster
# store, in one run, for one or more builds of the server; prints redis/memory per round.
#
# Usage: scripts/bench-durable.sh BIN [BIN...]    (each BIN a presence-service binary)
# Env:   LOADGEN (default ./target/release/presence-loadgen), SEEDS (the seed URLs of a running
#        Redis Cluster; the first three nodes' masters are flushed before each Redis run),
#        PORT (default 18310), USERS (10000), CONNECTIONS (64), DURATION (10s), ROUNDS (2),
#        MIN_REPLICAS (1), BOUND (0.5: the ratio the summary counts rounds reaching).
# Prints per run: rps, errors, p99 ms, the server's CPU per request, and the Redis masters' and
# replicas' CPU per request (read from /proc; they must run on this machine); per round, Redis ÷
# memory; at the end, per binary, those ratios' median.
# Only ever talks to 127.0.0.1; stops the servers it started.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

[[ $# -ge 1 ]] || lib_die "usage: $0 BIN [BIN...]"
[[ -n "${SEEDS:-}" ]] || lib_die "SEEDS: the seed URLs of a Redis Cluster (scripts/redis-cluster.sh up)"
LOADGEN="${LOADGEN:-./target/release/presence-loadgen}"
PORT="${PORT:-18310}"
USERS="${USERS:-10000}"
CONNECTIONS="${CONNECTIONS:-64}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-2}"
MIN_REPLICAS="${MIN_REPLICAS:-1}"
TARGET="http://127.0.0.1:${PORT}"
PID=

stop_server() {
  if [[ -n "$PID" ]]; then
    lib_stop_pids "$PID" || true
    PID=
  fi
}
trap stop_server EXIT

first_port="$(echo "$SEEDS" | cut -d, -f1 | sed 's#.*:##')"
mapfile -t MASTERS < <(redis-cli -p "$first_port" cluster nodes | awk '/master/ && !/fail/ { split($2, a, "[:@]"); print a[2] }')
mapfile -t REPLICAS < <(redis-cli -p "$first_port" cluster nodes | awk '/slave/ && !/fail/ { split($2, a, "[:@]"); print a[2] }')

# ticks PORT...: user + system CPU ticks of the local redis-server processes on those ports.
ticks() {
  local port pid sum=0
  for port in "$@"; do
    pid="$(redis-cli -p "$port" info server | awk -F: '/^process_id:/ { print $2 }' | tr -d '\r')"
    sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$sum"
}

# run LABEL BIN [VAR=VALUE...]: a fresh server, USERS put online, then DURATION of online posts.
run() {
  local label="$1" bin="$2"
  shift 2
  stop_server
  lib_spawn "${LOG:-/dev/null}" env PRESENCE_LISTEN="127.0.0.1:${PORT}" RUST_LOG=warn "$@" "$bin"
  PID=$LIB_PID
  lib_wait_http "${TARGET}/livez" 10 || lib_die "server did not start"
  local rps m0 r0
  m0="$(ticks "${MASTERS[@]}")"
  r0="$(ticks "${REPLICAS[@]}")"
  rps="$("$LOADGEN" --format json http --mode online --target "$TARGET" --users "$USERS" \
    --connections "$CONNECTIONS" --duration "$DURATION" --server-pid "$PID" 2>/dev/null |
    tail -n 1 | tee -a "${OUT:-/dev/null}" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["rps"]), r["errors"], r["latency_ms"]["p99"], r["server_cpu_us_per_req"], r["requests"])')"
  # The Redis masters' and replicas' CPU per request over the run (includes the USERS put
  # online first; ~0 on the memory store).
  python3 -c "import sys; a=sys.argv[1].split(); n=int(a[4]); t=1e6/int(sys.argv[2]); print('$label', *a[:4], round(int(sys.argv[3])*t/n, 2), round(int(sys.argv[4])*t/n, 2))" \
    "$rps" "$(getconf CLK_TCK)" "$(($(ticks "${MASTERS[@]}") - m0))" "$(($(ticks "${REPLICAS[@]}") - r0))"
  stop_server
}

declare -A RATIOS=()
echo "# machine: $(nproc) cores; load: $(cat /proc/loadavg); redis masters: ${MASTERS[*]}"
echo "# columns: label rps errors p99_ms server_cpu_us_per_request masters_cpu_us_per_request replicas_cpu_us_per_request"
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    mem="$(run "round$round memory $bin" "$bin")"
    echo "$mem"
    for m in "${MASTERS[@]}"; do redis-cli -p "$m" flushall >/dev/null; done
    red="$(run "round$round redis  $bin" "$bin" PRESENCE_REDIS_URL="$SEEDS" PRESENCE_REDIS_MIN_REPLICAS="$MIN_REPLICAS")"
    echo "$red"
    # unrounded: the summary compares it with BOUND (0.496 must not count as 0.50)
    ratio="$(python3 -c "import sys; print(float(sys.argv[2]) / float(sys.argv[1]))" \
      "$(echo "$mem" | awk '{print $4}')" "$(echo "$red" | awk '{print $4}')")"
    printf 'round%s ratio  %s redis/memory = %.2f\n' "$round" "$bin" "$ratio"
    RATIOS[$bin]+=" $ratio"
  done
done
# Issue 13's acceptance, from one run: each binary's ratios, their median, and how many rounds
# reach BOUND (default 0.5).
for bin in "$@"; do
  python3 - "$bin" "${BOUND:-0.5}" ${RATIOS[$bin]} <<'PY'
import statistics, sys
bin, bound, ratios = sys.argv[1], float(sys.argv[2]), [float(x) for x in sys.argv[3:]]
print(f"ratio {bin} redis/memory: rounds {' '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}; "
      f"at least {bound}: {sum(x >= bound for x in ratios)} of {len(ratios)}")
PY
done

#!/usr/bin/env bash
# The benchmarks of issues 3, 4 and 5 in docs/benchmarks.md, each in one run on one machine.
#
#   scripts/bench-cluster.sh redis     # issue 3: heartbeats/s with the Redis store vs redis-benchmark
#                                      #          SET on one master; Redis commands per heartbeat
#   scripts/bench-cluster.sh cluster   # issue 4: all-in-one vs gateway -> 1 shard vs gateway -> 3 shards
#   scripts/bench-cluster.sh push      # issue 5: WebSockets with 50 subscriptions each, all-in-one
#                                      #          (embedded store) and 2 gateways + 3 shards on Redis
#   scripts/bench-cluster.sh lease     # issue 13: CPU per WebSocket heartbeat, gateway + 3 shards on
#                                      #          Redis, for LEASE_BINS (builds, back to back)
#   scripts/bench-cluster.sh all       # redis, cluster and push, one after the other
#
# It starts its own Redis Cluster (scripts/redis-cluster.sh, ports REDIS_BASE_PORT..+5) and every
# service process on 127.0.0.1 ports PORT_BASE+10..PORT_BASE+42, and stops all of them (by PID)
# when it ends. Raw logs and loadgen output (JSON lines) go to OUT.
#
# Env: SKIP_BUILD=1          reuse the binaries in BIN_DIR (default target/release)
#      REDIS_BASE_PORT       default 7700            REDIS_DIR   default .tmp/rc-bench
#      PORT_BASE             default 18100           OUT         default .tmp/bench-out
#      issue 3: HB_USERS (10000), HB_ROUNDS (3), RB_REQUESTS (300000), CMD_USERS (20000),
#               REFRESH_RUN=0 to skip the PRESENCE_REDIS_REFRESH=20s run
#      issue 4: CL_USERS (10000), CL_ROUNDS (3), CL_DURATION (10s), CL_CONNECTIONS (64), CL_CONFIGS (default
#               "all shards1 shards3"; also "shards3-single": 3 shards, the gateway sending each
#               heartbeat in its own call, PRESENCE_COALESCE_HEARTBEATS=false; "shards3-nowindow": batches
#               do not wait to fill, PRESENCE_COALESCE_WINDOW=0s; "all-1w" and "shards3-1w": each
#               process with PRESENCE_WORKER_THREADS=1, so that the cluster's 4 processes do not
#               run 8 workers on 2 cores; "shards3-gw1w": only the gateway at one worker;
#               "shards3-sh1w": only the shards at one worker each), CL_PERF=1 or CL_PERF=<process name, e.g. shard1> (a
#               `perf record` of that process, else of the gateway or the all-in-one, mid-run into OUT; CL_PERF_FREQ samples/s, default 999), CL_PER_PROCESS=1
#               (each process's CPU per heartbeat), CL_SHOW_BATCH=1
#               (print the gateway's heartbeat batch metrics), CL_MODE=online (measure `POST /online`
#               of a device that changes platform each time, a durable change, instead of heartbeats;
#               CL_MODE=status: `GET /status/{userId}` of the users put online first), CL_BOUND
#               (1.5: the ratio the summary counts rounds within). The run ends with each cluster
#               configuration's CPU per heartbeat ÷ the all-in-one's ("all", and "all-1w" when it
#               ran), per round, and their median.
#      lease:   LEASE_BINS (presence-service binaries, space-separated; default BIN_DIR's),
#               LEASE_SOCKETS (10000), LEASE_INTERVAL (each socket's heartbeat interval, 2s),
#               LEASE_DURATION (30s), LEASE_ROUNDS (1)
#      issue 5: PUSH_SOCKETS (20000), PUSH_SOCKETS_AIO (the all-in-one's sockets; default the
#               most one process can hold under `ulimit -Hn`), PUSH_SUBS (50), PUSH_CHANGES (100),
#               PUSH_DURATION (60s), PUSH_PARTS (aio,cluster), PUSH_CLUSTER_ENV (extra settings of
#               the cluster's processes, e.g. "PRESENCE_REDIS_MIN_REPLICAS=0")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

WHAT="${1:-all}"
BIN_DIR="${BIN_DIR:-target/release}"
SERVER="$BIN_DIR/presence-service"
LOADGEN="$BIN_DIR/presence-loadgen"
REDIS_BASE_PORT="${REDIS_BASE_PORT:-7700}"
REDIS_DIR="${REDIS_DIR:-$REPO/.tmp/rc-bench}"
PORT_BASE="${PORT_BASE:-18100}"
OUT="${OUT:-$REPO/.tmp/bench-out}"
mkdir -p "$OUT"

# 20,000 sockets need more descriptors than the usual 1024 on both sides.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE="$(ulimit -n)"

if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --workspace --bins
fi
[[ -x "$SERVER" && -x "$LOADGEN" ]] || lib_die "no binaries in $BIN_DIR (cargo build --workspace --bins)"

declare -A PROC=()   # name -> pid of every service process we started
REDIS_STARTED=

stop_proc() {
  local name="$1" pid="${PROC[$1]:-}"
  [[ -n "$pid" ]] || return 0
  lib_stop_pids -t 15 "$pid" || true
  unset "PROC[$name]"
}

stop_all() {
  local n
  for n in "${!PROC[@]}"; do stop_proc "$n"; done
}

cleanup() {
  stop_all
  if ((${#LOADGEN_PIDS[@]})); then lib_stop_pids "${LOADGEN_PIDS[@]}" || true; fi
  if [[ -n "$REDIS_STARTED" ]]; then
    PRESENCE_REDIS_BASE_PORT="$REDIS_BASE_PORT" PRESENCE_REDIS_DIR="$REDIS_DIR" \
      bash scripts/redis-cluster.sh down >/dev/null 2>&1 || true
  fi
}
LOADGEN_PIDS=()
trap cleanup EXIT

# start NAME VAR=value...: a service process with those settings, logging to OUT/NAME.log.
start() {
  local name="$1"; shift
  lib_spawn "$OUT/$name.log" env RUST_LOG=warn "$@" "$SERVER"
  PROC[$name]=$LIB_PID
}

wait_ready() { # URL [seconds]
  lib_wait_http "$1/readyz" "${2:-60}" || lib_die "$1 not ready after ${2:-60}s"
}

metric() { # URL NAME: sum of the samples of a metric (all label sets)
  curl -fsS "$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%.0f\n", s }'
}

us_per_heartbeat() { # LINE TICKS: CPU clock ticks spent over the run of a loadgen JSON LINE, in µs per request
  echo "$1" | jq -r --argjson t "$2" '(($t / 100) / (.requests + .errors) * 1e6 * 100 | round) / 100'
}

cpu_ticks() { # PID...: utime + stime of the processes, in clock ticks
  local t=0 p f fields
  for p in "$@"; do
    f="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    read -r -a fields <<<"${f##*) }"
    t=$((t + fields[11] + fields[12]))
  done
  echo "$t"
}

rss_kb() { # PID...: summed VmRSS
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status"))); done
  echo "$t"
}

header() {
  echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  # BIN_DIR/COMMIT, when present, names the commit a copy of the binaries was built from.
  echo "# commit:  $(cat "$BIN_DIR/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown), binaries built $(date -u -r "$SERVER" +%H:%M:%SZ), run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# load:    $(cat /proc/loadavg)   nofile: $NOFILE   redis: $(redis-server --version | cut -d' ' -f3)"
}

# ------------------------------------------------------------------------------------ Redis

SEEDS=
MASTERS=()
redis_up() {
  [[ -n "$SEEDS" ]] && return 0
  SEEDS="$(PRESENCE_REDIS_BASE_PORT="$REDIS_BASE_PORT" PRESENCE_REDIS_DIR="$REDIS_DIR" \
    bash scripts/redis-cluster.sh up | tail -n1)"
  REDIS_STARTED=1
  mapfile -t MASTERS < <(redis-cli -p "$REDIS_BASE_PORT" cluster nodes |
    awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "[:@]"); print a[2] }' | sort -n)
  [[ ${#MASTERS[@]} -eq 3 ]] || lib_die "expected 3 masters, got: ${MASTERS[*]}"
  echo "# redis cluster: $SEEDS (masters ${MASTERS[*]})"
}

redis_flush() {
  local m
  for m in "${MASTERS[@]}"; do redis-cli -p "$m" flushall >/dev/null; done
  # the replicas follow; give them a moment so a WAIT does not see an old backlog
  sleep 0.5
}

redis_resetstat() {
  local m
  for m in "${MASTERS[@]}"; do redis-cli -p "$m" config resetstat >/dev/null; done
}

# cmdstat_<name> calls summed over the masters, one "name calls" line each.
redis_cmdstats() {
  local m
  for m in "${MASTERS[@]}"; do redis-cli -p "$m" info commandstats; done | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_/ { sub("cmdstat_", "", $1); c[$1] += $3 } END { for (k in c) print k, c[k] }' |
    sort
}

# Health, connection and replication commands (REPLCONF ACK: each replica, once a second), not
# counted as work.
HEALTH_RE='^(cluster|ping|info|config|command|client|hello|readonly|auth|select|replconf|psync|sync)(\||$)'

# ------------------------------------------------------------------------------------ issue 3

# One heartbeat-rate phase: the sim over REST with USERS devices at the default 30 s interval.
# Resets the command statistics of every master as soon as the sim has set everyone up, reads
# them and the server's counters exactly MEASURE seconds later (inside the sim's measured window).
commands_per_heartbeat() { # LABEL PID URL USERS
  local label="$1" pid="$2" url="$3" users="$4" measure=61
  local err="$OUT/$label.sim.err" res="$OUT/$label.sim.json"
  rm -f "$err" "$res"   # the wait below must not see a previous run's 'set up'
  "$LOADGEN" --format json sim --transport rest --target "$url" --users "$users" --devices 1 \
    --subscriptions 1 --interval 30s --duration 60s --changes 0 >"$res" 2>"$err" &
  local lg=$!
  LOADGEN_PIDS+=("$lg")
  until grep -q 'set up' "$err" 2>/dev/null; do
    kill -0 "$lg" 2>/dev/null || { cat "$err" >&2; lib_die "sim ended before set-up"; }
    sleep 0.02
  done
  redis_resetstat
  local t0 hb0 st0 ch0
  t0="$(date +%s.%N)"
  hb0="$(metric "$url" 'presence_heartbeats_total')"
  ch0="$(curl -fsS "$url/metrics" | awk '/^presence_http_requests_total\{/ && /route="\/api\/v1\/presence\/status\/\{userId\}"/ && /method="PUT"/ { s += $NF } END { print s + 0 }')"
  st0="$(curl -fsS "$url/metrics" | grep '^presence_redis_commands_total' || true)"
  sleep "$(echo "$t0 + $measure - $(date +%s.%N)" | bc)"
  local stats hb1 ch1 st1 secs
  stats="$(redis_cmdstats)"
  secs="$(echo "$(date +%s.%N) - $t0" | bc)"
  hb1="$(metric "$url" 'presence_heartbeats_total')"
  ch1="$(curl -fsS "$url/metrics" | awk '/^presence_http_requests_total\{/ && /route="\/api\/v1\/presence\/status\/\{userId\}"/ && /method="PUT"/ { s += $NF } END { print s + 0 }')"
  st1="$(curl -fsS "$url/metrics" | grep '^presence_redis_commands_total' || true)"
  wait "$lg" || lib_die "sim failed: $(tail -3 "$err")"
  echo "loadgen: $(cat "$res")"
  echo "window: ${secs}s after set-up; heartbeats (server counter) $((hb1 - hb0)); status changes (PUT /status) $((ch1 - ch0))"
  echo "redis commands on the masters in the window (cmdstat calls; EVAL also counts the commands its script calls):"
  printf '%s\n' "$stats" | sed 's/^/    /'
  echo "server's presence_redis_commands_total by op, before -> after:"
  paste <(echo "$st0") <(echo "$st1") | sed 's/^/    /'
  local work evals waits refresh hb=$((hb1 - hb0))
  work="$(echo "$stats" | awk -v re="$HEALTH_RE" '$1 !~ re { s += $2 } END { print s + 0 }')"
  evals="$(echo "$stats" | awk '$1 == "eval" || $1 == "evalsha" { s += $2 } END { print s + 0 }')"
  waits="$(echo "$stats" | awk '$1 == "wait" { s += $2 } END { print s + 0 }')"
  refresh=$(($(echo "$st1" | awk -F'[ ]' '/op="refresh"/ { print $2 }') + 0 - $(echo "$st0" | awk -F'[ ]' '/op="refresh"/ { print $2 }') - 0))
  echo "result=$label heartbeats=$hb changes=$((ch1 - ch0)) redis_commands=$work" \
    "commands_per_heartbeat=$(echo "scale=4; $work / $hb" | bc)" \
    "top_level_commands=$((evals + waits + refresh))" \
    "top_level_per_heartbeat=$(echo "scale=4; ($evals + $waits + $refresh) / $hb" | bc)" \
    "refresh_pexpire=$refresh refresh_per_heartbeat=$(echo "scale=4; $refresh / $hb" | bc)"
}

bench_redis() {
  echo "## issue 3: Redis Cluster store"
  redis_up
  local url="http://127.0.0.1:$((PORT_BASE + 10))" users="${HB_USERS:-10000}" rounds="${HB_ROUNDS:-3}"
  local n="${RB_REQUESTS:-300000}" m0="${MASTERS[0]}" tag r
  # A hash tag whose slot the first master serves, so that every key of redis-benchmark's
  # SET lands on that one node (a plain `-t set -r N` gets MOVED for 2/3 of its keys).
  for tag in a b c d e f g h i j k l m n o p q r s t u v w x y z; do
    local slot; slot="$(redis-cli -p "$m0" cluster keyslot "{$tag}")"
    redis-cli -p "$m0" cluster nodes | awk -v s="$slot" '/myself/ { for (i = 9; i <= NF; i++) { split($i, r, "-"); if (r[2] == "") r[2] = r[1]; if (s >= r[1] && s <= r[2]) f = 1 } } END { exit !f }' && break
  done
  echo "# redis-benchmark key: key:{$tag}:__rand_int__ (slot $(redis-cli -p "$m0" cluster keyslot "{$tag}"), master $m0)"

  echo "### (a) heartbeats/s through the service (all role, Redis store) vs redis-benchmark SET"
  redis_flush
  start all PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))" PRESENCE_REDIS_URL="$SEEDS"
  wait_ready "$url"
  local pid="${PROC[all]}"
  rb() {
    redis-benchmark -h 127.0.0.1 -p "$m0" -n "$n" -c 50 -P 1 -r "$users" -q \
      SET "key:{$tag}:__rand_int__" xxx 2>/dev/null | tr '\r' '\n' | grep 'requests per second' | tail -n1 |
      sed "s/^/redis-benchmark SET (port $m0, -c 50 -P 1 -r $users, -n $n): /"
  }
  # puts the users online, and warms up
  "$LOADGEN" --format json http --mode heartbeat --target "$url" --users "$users" --connections 64 \
    --duration 5s --server-pid "$pid" 2>/dev/null | sed 's/^/warm-up: /'
  rb
  for r in $(seq 1 "$rounds"); do
    redis_resetstat
    "$LOADGEN" --format json http --mode heartbeat --no-online --target "$url" --users "$users" \
      --connections 64 --duration 10s --server-pid "$pid" 2>/dev/null | sed "s/^/heartbeat $r: /"
    echo "redis commands during heartbeat run $r (masters, health excluded): $(redis_cmdstats | awk -v re="$HEALTH_RE" '$1 !~ re { s += $2; l = l " " $1 "=" $2 } END { print s + 0 " (" l " )" }')"
    rb
  done
  stop_proc all

  echo "### (b) Redis commands per heartbeat: ${CMD_USERS:-20000} devices over REST, 30 s interval, 60 s timeout, 60 s"
  redis_flush
  start all PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))" PRESENCE_REDIS_URL="$SEEDS"
  wait_ready "$url"
  commands_per_heartbeat cmds-default "${PROC[all]}" "$url" "${CMD_USERS:-20000}"
  stop_proc all

  if [[ "${REFRESH_RUN:-1}" != 0 ]]; then
    echo "### (c) the same with PRESENCE_REDIS_REFRESH=20s (write-behind refresh 30x as often as the default 10m)"
    redis_flush
    start all PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))" PRESENCE_REDIS_URL="$SEEDS" PRESENCE_REDIS_REFRESH=20s
    wait_ready "$url"
    commands_per_heartbeat cmds-refresh20s "${PROC[all]}" "$url" "${CMD_USERS:-20000}"
    stop_proc all
  fi
}

# ------------------------------------------------------------------------------------ issue 4

# Ports: all-in-one +10; gateways +41, +42; shard i (1..3): HTTP +20+i, gRPC +30+i.
start_cluster() { # SHARDS GATEWAYS [VAR=value...]
  local shards="$1" gateways="$2" i list=""
  shift 2
  for ((i = 1; i <= shards; i++)); do list+="${list:+,}127.0.0.1:$((PORT_BASE + 30 + i))"; done
  for ((i = 1; i <= shards; i++)); do
    start "shard$i" PRESENCE_ROLE=shard PRESENCE_REDIS_URL="$SEEDS" PRESENCE_SHARDS="$list" \
      PRESENCE_ADVERTISE="127.0.0.1:$((PORT_BASE + 30 + i))" PRESENCE_GRPC_LISTEN="127.0.0.1:$((PORT_BASE + 30 + i))" \
      PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 20 + i))" "$@" ${SHARD_ENV:-}
  done
  for ((i = 1; i <= gateways; i++)); do
    start "gw$i" PRESENCE_ROLE=gateway PRESENCE_SHARDS="$list" PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 40 + i))" "$@" ${GW_ENV:-}
  done
  for ((i = 1; i <= shards; i++)); do wait_ready "http://127.0.0.1:$((PORT_BASE + 20 + i))"; done
  for ((i = 1; i <= gateways; i++)); do wait_ready "http://127.0.0.1:$((PORT_BASE + 40 + i))"; done
  # every partition owned, and every gateway sees every shard (ring and event streams)
  local owned members streams
  for _ in $(seq 1 300); do
    owned=0
    for ((i = 1; i <= shards; i++)); do
      owned=$((owned + $(metric "http://127.0.0.1:$((PORT_BASE + 20 + i))" presence_owned_partitions)))
    done
    members=0 streams=0
    for ((i = 1; i <= gateways; i++)); do
      members=$((members + $(metric "http://127.0.0.1:$((PORT_BASE + 40 + i))" presence_ring_members)))
      streams=$((streams + $(metric "http://127.0.0.1:$((PORT_BASE + 40 + i))" presence_event_streams)))
    done
    if ((owned == 16384 && members == shards * gateways && streams == shards * gateways)); then
      return 0
    fi
    sleep 0.1
  done
  lib_die "cluster did not form: owned=$owned members=$members streams=$streams"
}

cluster_pids() { local n; for n in "${!PROC[@]}"; do echo "${PROC[$n]}"; done; }

bench_cluster() {
  echo "## issue 4: all-in-one vs gateway -> shards, on the Redis Cluster"
  redis_up
  local users="${CL_USERS:-10000}" rounds="${CL_ROUNDS:-3}" dur="${CL_DURATION:-10s}" r cfg url lead pids c0 c1 line n cpu
  local table="$OUT/cluster-cpu.tsv"
  : >"$table"
  for r in $(seq 1 "$rounds"); do
    for cfg in ${CL_CONFIGS:-all shards1 shards3}; do
      redis_flush
      case "$cfg" in
        all | all-1w)
          local -a workers=()
          [[ "$cfg" == all-1w ]] && workers=(PRESENCE_WORKER_THREADS=1)
          start all PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))" PRESENCE_REDIS_URL="$SEEDS" "${workers[@]}"
          url="http://127.0.0.1:$((PORT_BASE + 10))"
          wait_ready "$url" ;;
        shards3-1w) start_cluster 3 1 PRESENCE_WORKER_THREADS=1; url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards3-gw1w) GW_ENV=PRESENCE_WORKER_THREADS=1 start_cluster 3 1; url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards3-sh1w) SHARD_ENV=PRESENCE_WORKER_THREADS=1 start_cluster 3 1; url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards1) start_cluster 1 1; url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards3) start_cluster 3 1; url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards3-single)
          start_cluster 3 1 PRESENCE_COALESCE_HEARTBEATS=false
          url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        shards3-nowindow)
          start_cluster 3 1 PRESENCE_COALESCE_WINDOW=0s
          url="http://127.0.0.1:$((PORT_BASE + 41))" ;;
        *) lib_die "unknown CL_CONFIGS entry: $cfg" ;;
      esac
      lead="${PROC[all]:-${PROC[gw1]:-}}"
      mapfile -t pids < <(cluster_pids)
      # users online first (not measured), then the measured heartbeat run
      "$LOADGEN" --format json http --mode heartbeat --target "$url" --users "$users" --connections "${CL_CONNECTIONS:-64}" \
        --duration 2s --warmup 0s 2>/dev/null >/dev/null
      c0="$(cpu_ticks "${pids[@]}")"
      local -A each0=()
      if [[ -n "${CL_PER_PROCESS:-}" ]]; then
        for n in "${!PROC[@]}"; do each0[$n]="$(cpu_ticks "${PROC[$n]}")"; done
      fi
      if [[ -n "${CL_PERF:-}" ]]; then # a profile of the lead process (gateway) mid-run
        (sleep 3 && perf record -F ${CL_PERF_FREQ:-999} ${CL_PERF_CALLGRAPH:--g} -p "${PROC[${CL_PERF:-}]:-$lead}" -o "$OUT/$cfg.round$r.perf.data" -- sleep 4 >/dev/null 2>&1) &
      fi
      local -a measured=(--mode heartbeat --no-online)
      case "${CL_MODE:-heartbeat}" in
        online) measured=(--mode online) ;;
        status) measured=(--mode status --no-online) ;;
      esac
      line="$("$LOADGEN" --format json http "${measured[@]}" --target "$url" --users "$users" \
        --connections "${CL_CONNECTIONS:-64}" --duration "$dur" --server-pid "$lead" 2>/dev/null | tail -n 1)"
      c1="$(cpu_ticks "${pids[@]}")"
      if [[ -n "${CL_PER_PROCESS:-}" ]]; then # each process's CPU per heartbeat of the run
        for n in $(printf '%s\n' "${!PROC[@]}" | sort); do
          echo "$cfg round $r: $n cpu_us_per_heartbeat=$(us_per_heartbeat "$line" "$(($(cpu_ticks "${PROC[$n]}") - each0[$n]))")"
        done
      fi
      [[ -n "${CL_SHOW_BATCH:-}" ]] && curl -s "$url/metrics" | grep -E "^presence_(heartbeat(s_batched|_batches)|online(s_batched|_batches)|status(_reads_batched|_batches))_total|_sent_alone_total" | tr '\n' ' '
      echo "$cfg round $r: $line"
      cpu="$(us_per_heartbeat "$line" "$((c1 - c0))")"
      printf '%s\t%s\t%s\n' "$cfg" "$r" "$cpu" >>"$table"
      echo "$cfg round $r: processes=${#pids[@]} cpu_all_processes_us_per_heartbeat=$cpu" \
        "wrong_owner_retries=$(metric "$url" presence_wrong_owner_retries_total)"
      stop_all
    done
  done
  cluster_ratios "$table"
}

# Issue 13's acceptance, from one run: each cluster configuration's CPU per heartbeat (all its
# processes) ÷ the one-process baseline's of the same round, for each baseline that ran ("all",
# the all-in-one at its default workers, and "all-1w"); then the median over the rounds and how
# many rounds are within CL_BOUND (default 1.5). Rounds interleave the configurations, so a
# spell of host noise lands on a round, not on one configuration.
cluster_ratios() { # TABLE (lines: cfg, round, µs per heartbeat)
  python3 - "$1" "${CL_BOUND:-1.5}" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
bound = float(sys.argv[2])
cpu = {(c, int(r)): float(v) for c, r, v in rows}
configs = list(dict.fromkeys(c for c, _, _ in rows))
for base in [b for b in ("all", "all-1w") if b in configs]:
    for cfg in [c for c in configs if not c.startswith("all")]:
        ratios = [cpu[(cfg, r)] / cpu[(base, r)] for (c, r) in sorted(cpu) if c == cfg and (base, r) in cpu]
        if not ratios:
            continue
        within = sum(x <= bound for x in ratios)
        print(f"ratio {cfg} / {base}: rounds " + " ".join(f"{x:.2f}" for x in ratios)
              + f"; median {statistics.median(ratios):.2f}; within {bound}: {within} of {len(ratios)}")
PY
}

# ------------------------------------------------------------------------------------ issue 5

# Runs the sim in two loadgen processes (each: half the users, half the change rate, all the
# targets), so that no process needs more than ~SOCKETS/2 descriptors (where `ulimit -n` cannot be
# raised above 20000, one loadgen cannot hold 20,000 sockets). Each half subscribes within itself
# (user u to the next K users of its half); with two targets, sockets alternate between them, so
# most subscriptions cross gateways. Reads the gateways' RSS
# before the sockets open, once both sims have set everyone up, and at the end.
push_run() { # LABEL SOCKETS TARGETS GATEWAY_PIDS(comma) METRICS_URLS(comma)
  local label="$1" sockets="$2" targets="$3" gpids="$4" murls="$5"
  local subs="${PUSH_SUBS:-50}" changes="${PUSH_CHANGES:-100}" dur="${PUSH_DURATION:-60s}"
  local half=$((sockets / 2)) i lg=() before after end
  IFS=, read -r -a gp <<<"$gpids"
  before="$(rss_kb "${gp[@]}")"
  rm -f "$OUT/$label".sim[01].{json,err}   # the wait below must not see a previous run's 'set up'
  for i in 0 1; do
    "$LOADGEN" --format json sim --transport ws --target "$targets" --users "$half" --devices 1 \
      --subscriptions "$subs" --interval 30s --duration "$dur" --changes $((changes / 2)) \
      --first-user $((7000000000 + i * 1000000)) --gateway-pids "$gpids" \
      >"$OUT/$label.sim$i.json" 2>"$OUT/$label.sim$i.err" &
    lg+=($!)
    LOADGEN_PIDS+=($!)
  done
  until grep -q 'set up' "$OUT/$label.sim0.err" 2>/dev/null && grep -q 'set up' "$OUT/$label.sim1.err" 2>/dev/null; do
    for i in 0 1; do
      kill -0 "${lg[$i]}" 2>/dev/null || { tail -c 600 "$OUT/$label.sim$i.err" >&2; lib_die "$label: sim $i ended before set-up"; }
    done
    sleep 0.2
  done
  after="$(rss_kb "${gp[@]}")"
  local ws=0 u
  IFS=, read -r -a mu <<<"$murls"
  for u in "${mu[@]}"; do ws=$((ws + $(metric "$u" presence_ws_connections))); done
  local fail=0
  for i in 0 1; do wait "${lg[$i]}" || fail=1; done
  end="$(rss_kb "${gp[@]}")"
  for i in 0 1; do
    echo "$label sim $i: $(tail -n1 "$OUT/$label.sim$i.json")"
    grep -a 'device failed' "$OUT/$label.sim$i.err" | head -3 | sed "s/^/$label sim $i: /" || true
  done
  ((fail == 0)) || lib_die "$label: a sim failed (see $OUT/$label.sim*.err)"
  jq -s --arg lbl "$label" --argjson before "$before" --argjson after "$after" --argjson endkb "$end" \
    --argjson ws "$ws" '{
      result: $lbl,
      sockets: (map(.devices) | add), sockets_on_gateways_after_setup: $ws,
      devices_failed_to_connect: (map(.devices_failed_to_connect) | add),
      changes: (map(.changes) | add), changes_per_second: (map(.changes_per_second) | add),
      delivered: (map(.delivered) | add), expected: (map(.expected) | add),
      delivered_over_expected: ((map(.delivered) | add) / (map(.expected) | add)),
      presence_frames_per_second: (map(.presence_frames_per_second) | add),
      frames_per_second: (map(.frames_per_second) | add),
      heartbeats_per_second: (map(.heartbeats_per_second) | add),
      delay_ms_p50: (map(.delay_ms_p50)), delay_ms_p90: (map(.delay_ms_p90)),
      delay_ms_p99: (map(.delay_ms_p99)), delay_ms_max: (map(.delay_ms_max) | max),
      false_offlines: (map(.false_offlines) | add),
      sockets_closed_by_server: (map(.sockets_closed_by_server) | add),
      heartbeat_errors: (map(.heartbeat_errors) | add),
      gateway_rss_kb_before: $before, gateway_rss_kb_after_setup: $after, gateway_rss_kb_end: $endkb,
      gateway_rss_bytes_per_socket: ((($after - $before) * 1024 / (map(.devices) | add)) | round),
      gateway_rss_bytes_per_socket_end: ((($endkb - $before) * 1024 / (map(.devices) | add)) | round)
    }' "$OUT/$label.sim0.json" "$OUT/$label.sim1.json" | jq -c .
  for u in "${mu[@]}"; do
    echo "$label $u: presence_push_delay_seconds (change on the owner -> frame queued to sockets):" \
      "$(curl -fsS "$u/metrics" | awk '/^presence_push_delay_seconds_count/ { c = $NF } /^presence_push_delay_seconds_sum/ { s = $NF } END { printf "events=%d mean_ms=%.2f", c, c ? s / c * 1000 : 0 }')" \
      "frames_queued=$(metric "$u" presence_events_delivered_total) slow_consumers=$(metric "$u" presence_slow_consumers_total)"
  done
}

bench_push() {
  echo "## issue 5: push over WebSockets"
  local parts="${PUSH_PARTS:-aio,cluster}" sockets="${PUSH_SOCKETS:-20000}"
  # One process holds at most `ulimit -n` descriptors: its sockets plus ~40 of its own.
  local cap=$(((NOFILE - 100) / 2 * 2)) aio
  aio="${PUSH_SOCKETS_AIO:-$((sockets < cap ? sockets : cap))}"
  if [[ ",$parts," == *,aio,* ]]; then
    echo "### (a) all-in-one, embedded store: $aio sockets (nofile $NOFILE per process)"
    start all PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))"
    wait_ready "http://127.0.0.1:$((PORT_BASE + 10))"
    push_run push-aio "$aio" "http://127.0.0.1:$((PORT_BASE + 10))" "${PROC[all]}" "http://127.0.0.1:$((PORT_BASE + 10))"
    stop_all
  fi
  if [[ ",$parts," == *,cluster,* ]]; then
    echo "### (b) 2 gateways + 3 shards on the Redis Cluster: $sockets sockets, half on each gateway"
    redis_up
    redis_flush
    # shellcheck disable=SC2086 # PUSH_CLUSTER_ENV: extra VAR=value settings, space-separated
    start_cluster 3 2 ${PUSH_CLUSTER_ENV:-}
    local g1="http://127.0.0.1:$((PORT_BASE + 41))" g2="http://127.0.0.1:$((PORT_BASE + 42))"
    push_run push-cluster "$sockets" "$g1,$g2" "${PROC[gw1]},${PROC[gw2]}" "$g1,$g2"
    echo "shards' RSS (kB): $(rss_kb "${PROC[shard1]}") $(rss_kb "${PROC[shard2]}") $(rss_kb "${PROC[shard3]}")"
    stop_all
  fi
}

# Idle WebSockets (no subscriptions, no status changes) that send a heartbeat message every
# LEASE_INTERVAL, through a gateway in front of 3 shards on the Redis Cluster, one sim per build:
# the CPU of the 4 processes summed over the measured part (after set-up), per heartbeat
# message; and the heartbeat batches the gateway sent, and heartbeats the shards took, a second.
bench_lease() {
  echo "## issue 13: WebSocket heartbeats through the cluster (liveness lease)"
  redis_up
  local bins="${LEASE_BINS:-$SERVER}" sockets="${LEASE_SOCKETS:-10000}" every="${LEASE_INTERVAL:-2s}"
  local dur="${LEASE_DURATION:-30s}" rounds="${LEASE_ROUNDS:-1}" r bin label pid c0 c1 b0 b1 h0 h1 line i
  local g="http://127.0.0.1:$((PORT_BASE + 41))" saved="$SERVER"
  for r in $(seq 1 "$rounds"); do
    for bin in $bins; do
      SERVER="$bin"
      label="lease-r$r-$(basename "$(dirname "$bin")")"
      redis_flush
      start_cluster 3 1
      rm -f "$OUT/$label".{json,err}
      "$LOADGEN" --format json sim --transport ws --target "$g" --users "$sockets" --devices 1 \
        --subscriptions 0 --changes 0 --interval "$every" --duration "$dur" \
        >"$OUT/$label.json" 2>"$OUT/$label.err" &
      pid=$!
      LOADGEN_PIDS+=($pid)
      until grep -q 'set up' "$OUT/$label.err" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { tail -c 600 "$OUT/$label.err" >&2; lib_die "$label: sim ended before set-up"; }
        sleep 0.2
      done
      # shellcheck disable=SC2046 # one PID per word
      c0="$(cpu_ticks $(cluster_pids))"
      b0="$(metric "$g" presence_heartbeat_batches_total)"
      h0=0
      for i in 1 2 3; do h0=$((h0 + $(metric "http://127.0.0.1:$((PORT_BASE + 20 + i))" presence_heartbeats_total))); done
      wait "$pid" || lib_die "$label: the sim failed (see $OUT/$label.err)"
      # shellcheck disable=SC2046
      c1="$(cpu_ticks $(cluster_pids))"
      b1="$(metric "$g" presence_heartbeat_batches_total)"
      h1=0
      for i in 1 2 3; do h1=$((h1 + $(metric "http://127.0.0.1:$((PORT_BASE + 20 + i))" presence_heartbeats_total))); done
      line="$(tail -n1 "$OUT/$label.json")"
      echo "$line" | jq -c --arg lbl "$label" --arg bin "$bin" --argjson ticks $((c1 - c0)) \
        --argjson batches $((b1 - b0)) --argjson beats $((h1 - h0)) --arg hz "$(getconf CLK_TCK)" '{
          result: $lbl, binary: $bin, sockets: .devices, seconds: .measured_seconds,
          ws_heartbeats_per_second: .heartbeats_per_second, heartbeat_errors, false_offlines,
          cluster_cpu_cores: (($ticks / ($hz | tonumber)) / .measured_seconds * 1000 | round / 1000),
          cluster_cpu_us_per_ws_heartbeat: (($ticks / ($hz | tonumber)) * 1e6 / (.heartbeats_per_second * .measured_seconds) * 100 | round / 100),
          gateway_batches_per_second: ($batches / .measured_seconds | round),
          shard_heartbeats_per_second: ($beats / .measured_seconds | round)
        }'
      stop_all
    done
  done
  SERVER="$saved"
}

# Sourced (by scripts/scale.sh) for its helpers only: start_cluster, push_run, metric, rss_kb...
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  header
  case "$WHAT" in
    redis) bench_redis ;;
    cluster) bench_cluster ;;
    push) bench_push ;;
    lease) bench_lease ;;
    all) bench_redis; bench_cluster; bench_push ;;
    *) lib_die "usage: $0 redis|cluster|push|lease|all" ;;
  esac
fi

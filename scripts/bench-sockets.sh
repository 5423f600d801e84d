#!/usr/bin/env bash
# Gateway memory per idle WebSocket (issue 13), for one build or several back to back, so that
# before/after figures come from one run on one machine (docs/benchmarks.md, "Issue 13: memory
# per idle WebSocket").
#
#   scripts/bench-sockets.sh BIN [BIN...]     # each BIN a presence-service binary
#
# An idle socket: connected, its device online, no subscriptions, a heartbeat every 30 s over
# the socket and nothing else (but `sim --changes 0` still changes one random user's status a
# second, which reaches that user's own socket: ~35 frames in all). For each round, shape and binary (in that nesting), it starts the
# server(s), opens the sockets from two `presence-loadgen sim` processes side by side (each
# holds half of them: RLIMIT_NOFILE is 20,000 per process here), and reads the gateways' VmRSS
# before the sockets open (after a warm-up of 500 sockets that open and close), once every
# socket got its welcome, and at the end (after
# IDLE_DURATION, so that every socket has sent a heartbeat and got its reply). Shapes:
#   aio      one process in role `all` on the embedded store: AIO_SOCKETS sockets (default
#            the most one process holds under `ulimit -Hn`, 19,900 at a limit of 20,000); its
#            figure includes the presence state of its devices, since this process owns them
#   cluster  2 gateways in front of 1 shard on the embedded store: SOCKETS sockets (default
#            20,000), half on each gateway; the figure is the two gateways' RSS
# Prints one JSON line per run, then a table of bytes per socket.
#
# Env: LOADGEN  the loadgen binary (default target/release/presence-loadgen)
#      SHAPES   default aio,cluster        ROUNDS   default 1
#      SOCKETS  default 20000              AIO_SOCKETS   default min(SOCKETS, ulimit -Hn - 100)
#      IDLE_DURATION  default 35s          PORT_BASE  default 18400 (uses +10, +21, +31, +41, +42)
#      SUBS     subscriptions per user (default 0: idle sockets); with K > 0 each user subscribes
#               to the next K users of its half (as in `bench-cluster.sh push`)
#      OUT      default .tmp/bench-sockets (server logs, loadgen output)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

(($#)) || lib_die "usage: $0 BIN [BIN...]"
BINS=()
for b in "$@"; do
  [[ -x "$b" ]] || lib_die "$b: not an executable"
  BINS+=("$(realpath "$b")")
done
LOADGEN="$(realpath "${LOADGEN:-target/release/presence-loadgen}")"
[[ -x "$LOADGEN" ]] || lib_die "$LOADGEN: not an executable (set LOADGEN)"
SHAPES="${SHAPES:-aio,cluster}"
ROUNDS="${ROUNDS:-1}"
SOCKETS="${SOCKETS:-20000}"
IDLE_DURATION="${IDLE_DURATION:-35s}"
SUBS="${SUBS:-0}"
PORT_BASE="${PORT_BASE:-18400}"
OUT="${OUT:-$PWD/.tmp/bench-sockets}"
mkdir -p "$OUT"

ulimit -n "$(ulimit -Hn)"
NOFILE="$(ulimit -n)"
CAP=$(((NOFILE - 100) / 2 * 2))
AIO_SOCKETS="${AIO_SOCKETS:-$((SOCKETS < CAP ? SOCKETS : CAP))}"

PIDS=()
SIMS=()
cleanup() {
  if ((${#SIMS[@]})); then lib_stop_pids -t 5 "${SIMS[@]}" || true; fi
  if ((${#PIDS[@]})); then lib_stop_pids -t 15 "${PIDS[@]}" || true; fi
}
trap cleanup EXIT

rss_kb() { # PID...: summed VmRSS
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status"))); done
  echo "$t"
}

metric() { # URL NAME: sum of the samples of a metric
  curl -fsS "$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%.0f\n", s }'
}

start() { # LOG BIN VAR=value...: a service process; its PID in LIB_PID
  local log="$1" bin="$2"
  shift 2
  lib_spawn "$log" env RUST_LOG=warn "$@" "$bin"
  PIDS+=("$LIB_PID")
}

stop_servers() {
  if ((${#PIDS[@]})); then lib_stop_pids -t 15 "${PIDS[@]}" || true; fi
  PIDS=()
}

# run LABEL BIN SHAPE: one measurement, one JSON line.
run() {
  local label="$1" bin="$2" shape="$3" sockets targets gp=() urls=() i u
  case "$shape" in
    aio)
      sockets="$AIO_SOCKETS"
      start "$OUT/$label.all.log" "$bin" PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 10))"
      gp=("$LIB_PID")
      urls=("http://127.0.0.1:$((PORT_BASE + 10))")
      ;;
    cluster)
      sockets="$SOCKETS"
      local shard="127.0.0.1:$((PORT_BASE + 31))"
      start "$OUT/$label.shard.log" "$bin" PRESENCE_ROLE=shard PRESENCE_SHARDS="$shard" \
        PRESENCE_ADVERTISE="$shard" PRESENCE_GRPC_LISTEN="$shard" \
        PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 21))"
      lib_wait_http "http://127.0.0.1:$((PORT_BASE + 21))/readyz" 60 || lib_die "$label: shard not ready"
      for i in 1 2; do
        start "$OUT/$label.gw$i.log" "$bin" PRESENCE_ROLE=gateway PRESENCE_SHARDS="$shard" \
          PRESENCE_LISTEN="127.0.0.1:$((PORT_BASE + 40 + i))"
        gp+=("$LIB_PID")
        urls+=("http://127.0.0.1:$((PORT_BASE + 40 + i))")
      done
      ;;
    *) lib_die "unknown shape $shape" ;;
  esac
  for u in "${urls[@]}"; do lib_wait_http "$u/readyz" 60 || lib_die "$label: $u not ready"; done
  if [[ "$shape" == cluster ]]; then
    # every gateway has its event stream to the shard
    for u in "${urls[@]}"; do
      lib_wait_until 30 test "$(metric "$u" presence_event_streams)" = 1 || lib_die "$label: no event stream on $u"
    done
  fi
  local before after end half=$((sockets / 2)) targets
  targets="$(IFS=,; echo "${urls[*]}")"
  # Warm-up: 500 sockets open and close first (other users), so that what every process
  # allocates once (gRPC streams, per-thread arenas, buffers) is not counted per socket.
  "$LOADGEN" --format json sim --transport ws --target "$targets" --users 500 --devices 1 \
    --subscriptions 0 --interval 30s --duration 1s --changes 0 --first-user 6000000000 \
    >"$OUT/$label.warmup.json" 2>"$OUT/$label.warmup.err" || lib_die "$label: warm-up failed"
  # past the close grace (5 s), so that their devices have gone offline
  sleep 7
  before="$(rss_kb "${gp[@]}")"
  rm -f "$OUT/$label".sim[01].{json,err}
  SIMS=()
  for i in 0 1; do
    "$LOADGEN" --format json sim --transport ws --target "$targets" --users "$half" --devices 1 \
      --subscriptions "$SUBS" --interval 30s --duration "$IDLE_DURATION" --changes 0 \
      --first-user $((7000000000 + i * 1000000)) \
      >"$OUT/$label.sim$i.json" 2>"$OUT/$label.sim$i.err" &
    SIMS+=($!)
  done
  until grep -q 'set up' "$OUT/$label.sim0.err" 2>/dev/null && grep -q 'set up' "$OUT/$label.sim1.err" 2>/dev/null; do
    for i in 0 1; do
      lib_pid_alive "${SIMS[$i]}" || { tail -c 600 "$OUT/$label.sim$i.err" >&2; lib_die "$label: sim $i ended before set-up"; }
    done
    sleep 0.2
  done
  after="$(rss_kb "${gp[@]}")"
  local ws=0
  for u in "${urls[@]}"; do ws=$((ws + $(metric "$u" presence_ws_connections))); done
  local fail=0
  for i in 0 1; do wait "${SIMS[$i]}" || fail=1; done
  SIMS=()
  end="$(rss_kb "${gp[@]}")"
  ((fail == 0)) || lib_die "$label: a sim failed (see $OUT/$label.sim*.err)"
  jq -s -c --arg run "$label" --arg bin "$bin" --arg shape "$shape" --argjson before "$before" \
    --argjson after "$after" --argjson endkb "$end" --argjson ws "$ws" '{
      run: $run, bin: $bin, shape: $shape,
      sockets: (map(.devices) | add), sockets_open_after_setup: $ws,
      failed_to_connect: (map(.devices_failed_to_connect) | add),
      closed_by_server: (map(.sockets_closed_by_server) | add),
      heartbeats: (map(.heartbeats_per_second * .measured_seconds) | add | round),
      heartbeat_errors: (map(.heartbeat_errors) | add),
      false_offlines: (map(.false_offlines) | add),
      rss_kb_before: $before, rss_kb_after_setup: $after, rss_kb_end: $endkb,
      bytes_per_socket: ((($after - $before) * 1024 / (map(.devices) | add)) | round),
      bytes_per_socket_end: ((($endkb - $before) * 1024 / (map(.devices) | add)) | round)
    }' "$OUT/$label.sim0.json" "$OUT/$label.sim1.json" | tee -a "$OUT/results.jsonl"
  stop_servers
}

echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); load: $(cut -d' ' -f1-3 /proc/loadavg); nofile: $NOFILE"
echo "# run: $(date -u +%Y-%m-%dT%H:%M:%SZ); loadgen: $LOADGEN; subscriptions per user: $SUBS"
: >"$OUT/results.jsonl"
IFS=, read -r -a shapes <<<"$SHAPES"
for r in $(seq 1 "$ROUNDS"); do
  for shape in "${shapes[@]}"; do
    for i in "${!BINS[@]}"; do
      run "r$r-$shape-bin$i" "${BINS[$i]}" "$shape"
    done
  done
done
echo
echo "| round | shape | binary | sockets | RSS before → after set-up → end (MiB) | bytes per socket (after set-up, end) |"
echo "| --- | --- | --- | ---: | --- | ---: |"
jq -r '"| \(.run | split("-")[0]) | \(.shape) | \(.bin | split("/") | last) | \(.sockets) | \(.rss_kb_before / 1024 * 10 | round / 10) → \(.rss_kb_after_setup / 1024 * 10 | round / 10) → \(.rss_kb_end / 1024 * 10 | round / 10) | \(.bytes_per_socket), \(.bytes_per_socket_end) |"' \
  "$OUT/results.jsonl"

#!/usr/bin/env bash
# The scale run of issue 13: a million devices through 2 gateways and 3 shards on a Redis Cluster,
# then kill -9 of a shard; a burst of ~100k devices expiring within a second; push through the
# cluster. Prints progress as it goes and writes a report (Markdown) and a plot (PNG).
#
#   bash scripts/scale.sh            # the full run (~15 min); report: docs/scale-report.md, docs/scale.png
#   bash scripts/scale.sh --ci       # the reduced run CI does so that this script does not rot
#                                    # (100k devices, 60 s timeout, expiry bursts of 1k and 10k,
#                                    # 2k sockets; debug binaries; report under .tmp/scale; ~5 min)
#
# Phases (each on a fresh cluster where noted):
#   1. fill: SCALE_DEVICES devices (one per user) go online over REST, half through each gateway.
#      Reports the rate, each shard's RSS and bytes per device, Redis memory per device.
#   2. heartbeats: both gateways take REST heartbeats for SCALE_HB_DURATION, closed loop, cycling
#      over every device. 2 cores cannot carry a million devices at a 30 s interval (33k/s),
#      so the heartbeat interval and timeout are scaled up: PRESENCE_HEARTBEAT_TIMEOUT is
#      SCALE_TIMEOUT (default 300s, 5x the default 60s); the report states the interval the
#      measured rate represents (devices / rate).
#   3. kill -9 of shard 2 (a third of the partitions). Reports how long until the survivors own
#      every partition, the handoff (load from Redis) duration from presence_handoff_duration_seconds,
#      and how long until every device is OFFLINE (no heartbeats after the kill, so every device
#      is silent: each must go OFFLINE at its own deadline, those of the dead shard included).
#   4. expiry bursts (fresh cluster, PRESENCE_HEARTBEAT_TIMEOUT=SCALE_EXP_TIMEOUT): `presence-loadgen
#      expire` once per size in SCALE_EXP_SIZES: that many devices heartbeated in one burst (sent
#      straight to their owners as HeartbeatBatch calls), watched over WebSockets; lateness of
#      each OFFLINE after its deadline.
#   5. push (fresh cluster): SCALE_PUSH_SOCKETS sockets x 50 subscriptions, half per gateway;
#      delay from the status change to the frame.
# A sampler writes, once a second, every shard's online devices and RSS to OUT/samples.tsv; the
# plot draws it with the phases marked.
#
# Env: SCALE_DEVICES (1000000), SCALE_TIMEOUT (300s), SCALE_HB_DURATION (30s),
#      SCALE_EXP_SIZES ("1000 10000 100000"), SCALE_EXP_TIMEOUT (30s: longer than putting the
#      largest size online and subscribing to it), SCALE_PUSH_SOCKETS (20000),
#      SCALE_PUSH_DURATION (60s), SCALE_PARTS (main,expire,push: the phases 1-3, 4, 5 to run), SCALE_WORKERS (every server's PRESENCE_WORKER_THREADS; 1 is
#      the Helm chart's default shape; default: theirs), SCALE_TIMER_TICK (the servers' PRESENCE_TIMER_TICK; default:
#      theirs), REPORT_DIR (docs), SKIP_BUILD=1 (use the binaries in BIN_DIR, default
#      target/release), PORT_BASE (18500), REDIS_BASE_PORT (7800), OUT (.tmp/scale).
# Needs redis-server (scripts/redis-cluster.sh), jq, curl and python3; installs matplotlib
# (pinned) into .tmp/plot-venv for the plot. Under CI=true a missing piece fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

CI_RUN=
if [[ "${1:-}" == "--ci" ]]; then
  CI_RUN=1
  : "${SCALE_DEVICES:=100000}" "${SCALE_TIMEOUT:=60s}" "${SCALE_HB_DURATION:=10s}"
  : "${SCALE_EXP_SIZES:=1000 10000}" "${SCALE_EXP_TIMEOUT:=20s}" "${SCALE_PUSH_SOCKETS:=2000}"
  : "${SCALE_PUSH_DURATION:=15s}" "${REPORT_DIR:=$REPO/.tmp/scale}" "${BIN_DIR:=target/debug}"
  # --tests: the features of `cargo test` (scripts/test.sh), so that CI reuses that build
  if [[ -z "${SKIP_BUILD:-}" ]]; then cargo build --workspace --bins --tests; fi
  SKIP_BUILD=1
fi
DEVICES="${SCALE_DEVICES:-1000000}"
TIMEOUT="${SCALE_TIMEOUT:-300s}"
HB_DURATION="${SCALE_HB_DURATION:-30s}"
EXP_SIZES="${SCALE_EXP_SIZES:-1000 10000 100000}"
EXP_TIMEOUT="${SCALE_EXP_TIMEOUT:-30s}"
PUSH_SOCKETS="${SCALE_PUSH_SOCKETS:-20000}"
REPORT_DIR="${REPORT_DIR:-$REPO/docs}"
MATPLOTLIB_VERSION=3.10.9
export PORT_BASE="${PORT_BASE:-18500}" REDIS_BASE_PORT="${REDIS_BASE_PORT:-7800}"
export REDIS_DIR="${REDIS_DIR:-$REPO/.tmp/rc-scale}" OUT="${OUT:-$REPO/.tmp/scale}"
export PUSH_SUBS=50 PUSH_CHANGES=100 PUSH_DURATION="${SCALE_PUSH_DURATION:-60s}"
export BIN_DIR SKIP_BUILD
mkdir -p "$OUT" "$REPORT_DIR"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/*.err "$OUT/samples.tsv"

# The helpers (start_cluster, push_run, metric, rss_kb, redis_up, ...) and their cleanup trap.
# shellcheck source=scripts/bench-cluster.sh
source scripts/bench-cluster.sh

# secs DURATION: a humantime duration (300s, 5m, 1m30s, 1500ms, 1h; a bare number is seconds) in
# whole seconds, rounded down.
secs() {
  local d="$1" ms=0 n
  [[ "$d" =~ ^[0-9]+$ ]] && d="${d}s"
  while [[ "$d" =~ ^([0-9]+)(ms|s|m|h)(.*)$ ]]; do
    n="${BASH_REMATCH[1]}"
    case "${BASH_REMATCH[2]}" in
      ms) ms=$((ms + n)) ;;
      s) ms=$((ms + n * 1000)) ;;
      m) ms=$((ms + n * 60000)) ;;
      h) ms=$((ms + n * 3600000)) ;;
    esac
    d="${BASH_REMATCH[3]}"
  done
  [[ -z "$d" && "$1" =~ ^[0-9] ]] || lib_die "not a duration: '$1' (e.g. 300s, 5m, 1m30s)"
  echo $((ms / 1000))
}

# handoff_gained count|sum: the survivors' (shards 1 and 3)
# presence_handoff_duration_seconds_{count,sum}{direction="gained"}, summed.
handoff_gained() {
  local i
  for i in 1 3; do curl -fsS "$(shard_url "$i")/metrics"; done |
    awk -v n="presence_handoff_duration_seconds_$1{direction=\"gained\"}" -v f="$([[ $1 == sum ]] && echo %.6f || echo %.0f)" \
      '$1 == n { s += $2 } END { printf f "\n", s }'
}
TIMEOUT_S="$(secs "$TIMEOUT")"
SERVER_ENV=()
[[ -n "${SCALE_TIMER_TICK:-}" ]] && SERVER_ENV=("PRESENCE_TIMER_TICK=$SCALE_TIMER_TICK")
[[ -n "${SCALE_WORKERS:-}" ]] && SERVER_ENV+=("PRESENCE_WORKER_THREADS=$SCALE_WORKERS")

shard_url() { echo "http://127.0.0.1:$((PORT_BASE + 20 + $1))"; }
gw_url() { echo "http://127.0.0.1:$((PORT_BASE + 40 + $1))"; }
shard_grpc() { echo "127.0.0.1:$((PORT_BASE + 30 + $1))"; }
now() { date +%s.%N | cut -c1-14; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
after() { awk -v a="$1" -v s="$2" -v b="$(now)" 'BEGIN { exit !(b - a > s) }'; } # T SECONDS: more than SECONDS since T
redis_used() { # summed used_memory of the masters, bytes
  local p t=0
  for p in "${MASTERS[@]}"; do
    t=$((t + $(redis-cli -p "$p" info memory | awk -F: '/^used_memory:/ { print $2 + 0 }')))
  done
  echo "$t"
}
online_sum() { # online devices over the live shards given
  local i t=0
  for i in "$@"; do t=$((t + $(metric "$(shard_url "$i")" presence_online_devices 2>/dev/null || echo 0))); done
  echo "$t"
}
progress() { echo "[scale $(date -u +%H:%M:%S)] $*" >&2; }

# --------------------------------------------------------------------------------- the sampler

T0="$(now)"
PHASE_FILE="$OUT/phase"
echo setup >"$PHASE_FILE"
phase() { echo "$1" >"$PHASE_FILE"; progress "phase: $1"; }
printf 't\tphase\tonline1\tonline2\tonline3\trss1_kb\trss2_kb\trss3_kb\n' >"$OUT/samples.tsv"
sampler() {
  while :; do
    local line i o r
    line="$(since "$T0")\t$(cat "$PHASE_FILE")"
    o="" r=""
    for i in 1 2 3; do
      local pid="${PROC[shard$i]:-}"
      if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        # A shard just killed can still pass `kill -0` (not reaped yet): its reads fail, and
        # must not end the sampler (errexit), whose stop would then fail the run.
        o+="\t$(curl -fsS -m 1 "$(shard_url "$i")/metrics" 2>/dev/null | awk '$1 == "presence_online_devices" { print $2 + 0 }' || true)"
        r+="\t$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
      else
        o+="\t" r+="\t"
      fi
    done
    printf '%b%b%b\n' "$line" "$o" "$r" >>"$OUT/samples.tsv"
    sleep 1
  done
}
# The sampler reads PROC, which changes as clusters start and stop: it runs in a subshell that
# is restarted with each cluster.
SAMPLER=
sampler_start() { sampler & SAMPLER=$!; LOADGEN_PIDS+=("$SAMPLER"); }
sampler_stop() {
  if [[ -n "$SAMPLER" ]]; then
    kill "$SAMPLER" 2>/dev/null || true # it may have ended already
    wait "$SAMPLER" 2>/dev/null || true
  fi
  SAMPLER=
}

header
R="$OUT/results.env"   # KEY=value figures for the report
: >"$R"
fig() { echo "$1=$2" >>"$R"; echo "  $1 = $2" >&2; }
fig devices "$DEVICES"
fig timeout_s "$TIMEOUT_S"
fig workers "${SCALE_WORKERS:-one per CPU (the default)}"

PARTS=",${SCALE_PARTS:-main,expire,push},"
redis_up

# ------------------------------------------------------------------ 1. fill (a million devices)

if [[ "$PARTS" == *,main,* ]]; then
redis_flush
phase "cluster up"
start_cluster 3 2 PRESENCE_HEARTBEAT_TIMEOUT="$TIMEOUT" PRESENCE_HEARTBEAT_INTERVAL="$((TIMEOUT_S / 2))s" "${SERVER_ENV[@]}"
sampler_start
sleep 3 # the allocator gives back what start-up took, before the baseline is read
rss0=() ; for i in 1 2 3; do rss0[i]="$(rss_kb "${PROC[shard$i]}")"; done
redis0="$(redis_used)"
phase fill
half=$((DEVICES / 2))
t="$(now)"
"$LOADGEN" --format json fill --target "$(gw_url 1)" --users "$half" --user-base 1 --connections 32 \
  >"$OUT/fill1.json" 2> >(sed -u 's/^/[fill gw1] /' >&2) &
f1=$! LOADGEN_PIDS+=($!)
"$LOADGEN" --format json fill --target "$(gw_url 2)" --users "$((DEVICES - half))" --user-base $((half + 1)) \
  --connections 32 >"$OUT/fill2.json" 2> >(sed -u 's/^/[fill gw2] /' >&2) &
f2=$! LOADGEN_PIDS+=($!)
wait "$f1" && wait "$f2" || lib_die "fill failed (see $OUT/fill*.json)"
fill_s="$(since "$t")"
filled=$(($(jq -s 'map(.devices) | add' "$OUT/fill1.json" "$OUT/fill2.json")))
fig fill_seconds "$fill_s"
fig fill_devices "$filled"
fig fill_errors "$(jq -s 'map(.errors) | add' "$OUT/fill1.json" "$OUT/fill2.json")"
fig fill_per_second "$(awk -v n="$filled" -v s="$fill_s" 'BEGIN { printf "%.0f", n / s }')"
sleep 2
online_after_fill="$(online_sum 1 2 3)"
fig online_after_fill "$online_after_fill"
((online_after_fill == DEVICES)) || lib_die "$online_after_fill of $DEVICES devices online after the fill"
for i in 1 2 3; do
  on="$(metric "$(shard_url "$i")" presence_online_devices)"
  rss1="$(rss_kb "${PROC[shard$i]}")"
  fig "shard${i}_devices" "$on"
  fig "shard${i}_rss_mb" "$((rss1 / 1024))"
  fig "shard${i}_bytes_per_device" "$(( (rss1 - rss0[i]) * 1024 / (on > 0 ? on : 1) ))"
done
redis1="$(redis_used)"
fig redis_bytes_per_device "$(( (redis1 - redis0) / DEVICES ))"

# ------------------------------------------------------------------------------ 2. heartbeats

phase heartbeats
for g in 1 2; do
  base=$(( g == 1 ? 1 : half + 1 )) users=$(( g == 1 ? half : DEVICES - half ))
  "$LOADGEN" --format json http --mode heartbeat --no-online --target "$(gw_url "$g")" \
    --user-base "$base" --users "$users" --connections 32 --warmup 0s --duration "$HB_DURATION" \
    >"$OUT/hb$g.json" 2> >(sed -u "s/^/[heartbeats gw$g] /" >&2) &
  LOADGEN_PIDS+=($!)
done
wait "${LOADGEN_PIDS[@]: -2}" || lib_die "heartbeat run failed"
hb_end="$(now)"
hb_rate="$(jq -s 'map(.rps) | add | round' "$OUT/hb1.json" "$OUT/hb2.json")"
fig heartbeats_per_second "$hb_rate"
fig heartbeat_errors "$(jq -s 'map(.errors) | add' "$OUT/hb1.json" "$OUT/hb2.json")"
fig heartbeat_p99_ms "$(jq -s 'map(.latency_ms.p99) | max' "$OUT/hb1.json" "$OUT/hb2.json")"
fig represented_interval_s "$(awk -v n="$DEVICES" -v r="$hb_rate" 'BEGIN { printf "%.0f", (r > 0 ? n / r : 0) }')"

# -------------------------------------------------------------------------- 3. kill -9 a shard

phase "kill -9 shard 2"
dead_devices="$(metric "$(shard_url 2)" presence_online_devices)"
dead_parts="$(metric "$(shard_url 2)" presence_owned_partitions)"
fig dead_shard_devices "$dead_devices"
fig dead_shard_partitions "$dead_parts"
hcount0="$(handoff_gained count)"
hsum0="$(handoff_gained sum)"
kill -9 "${PROC[shard2]}"
t_kill="$(now)"
unset "PROC[shard2]"
phase "handoff"
until (($(metric "$(shard_url 1)" presence_owned_partitions) + $(metric "$(shard_url 3)" presence_owned_partitions) == 16384)); do
  sleep 0.1
  after "$t_kill" 120 && lib_die "the survivors did not take over within 120s"
done
fig owned_all_after_kill_s "$(since "$t_kill")"
# The load of the gained partitions is done when the handoff histogram has counted it.
until (($(handoff_gained count) > hcount0)); do
  sleep 0.1
done
hsum1="$(handoff_gained sum)"
fig handoff_load_s "$(awk -v a="$hsum0" -v b="$hsum1" 'BEGIN { printf "%.2f", b - a }')"
fig handoff_done_after_kill_s "$(since "$t_kill")"
sleep 1
fig online_after_handoff "$(online_sum 1 3)"
phase "silent: waiting for every OFFLINE"
last_deadline="$(awk -v a="$hb_end" -v t="$TIMEOUT_S" 'BEGIN { printf "%.3f", a + t }')"
while :; do
  left="$(online_sum 1 3)"
  ((left == 0)) && break
  progress "$left devices still online; the last deadline is in $(awk -v d="$last_deadline" -v n="$(now)" 'BEGIN { printf "%.0f", d - n }')s"
  after "$last_deadline" 120 && lib_die "$left devices still online 120s after the last deadline"
  sleep 5
done
fig all_offline_after_kill_s "$(since "$t_kill")"
fig all_offline_after_last_deadline_s "$(awk -v d="$last_deadline" -v n="$(now)" 'BEGIN { printf "%.1f", n - d }')"
for i in 1 3; do fig "shard${i}_rss_mb_end" "$(( $(rss_kb "${PROC[shard$i]}") / 1024 ))"; done
sampler_stop
stop_all
fi

# --------------------------------------------------------------------------- 4. expiry burst

if [[ "$PARTS" == *,expire,* ]]; then
redis_flush
phase "expiry burst"
start_cluster 3 2 PRESENCE_HEARTBEAT_TIMEOUT="$EXP_TIMEOUT" PRESENCE_HEARTBEAT_INTERVAL="$(($(secs "$EXP_TIMEOUT") / 2))s" "${SERVER_ENV[@]}"
sampler_start
k=0
for n in $EXP_SIZES; do
  k=$((k + 1))
  progress "expiry burst of $n devices"
  "$LOADGEN" --format json expire --gateways "$(gw_url 1),$(gw_url 2)" \
    --shards "$(shard_grpc 1),$(shard_grpc 2),$(shard_grpc 3)" --targets "$n" \
    --first-user $((8000000000 + k * 10000000)) --in-flight 16 \
    --timeout "$EXP_TIMEOUT" >"$OUT/expire$n.json" 2> >(sed -u "s/^/[expire $n] /" >&2) ||
    lib_die "expire run failed: $(cat "$OUT/expire$n.json")"
  for key in heartbeat_burst_ms deadlines_spread_ms offlines_spread_ms missed early lateness_ms_p50 lateness_ms_p99 lateness_ms_max; do
    fig "expire${n}_$key" "$(jq -r ".$key" "$OUT/expire$n.json")"
  done
done
fig expire_sizes "${EXP_SIZES// /,}"
sampler_stop
stop_all
fi

# ---------------------------------------------------------------------------------- 5. push

if [[ "$PARTS" == *,push,* ]]; then
redis_flush
phase "push"
start_cluster 3 2 "${SERVER_ENV[@]}"
push_run push-scale "$PUSH_SOCKETS" "$(gw_url 1),$(gw_url 2)" "${PROC[gw1]},${PROC[gw2]}" "$(gw_url 1),$(gw_url 2)" |
  tee "$OUT/push.txt" >&2
line="$(grep '"result":"push-scale"' "$OUT/push.txt")"
fig push_sockets "$(jq -r .sockets <<<"$line")"
fig push_delivered "$(jq -r .delivered <<<"$line")"
fig push_expected "$(jq -r .expected <<<"$line")"
fig push_delay_ms_p99 "$(jq -r '.delay_ms_p99 | max' <<<"$line")"
fig push_delay_ms_max "$(jq -r .delay_ms_max <<<"$line")"
fig push_false_offlines "$(jq -r .false_offlines <<<"$line")"
stop_all
fi

# ---------------------------------------------------------------------------- report and plot

phase done
PLOT="$REPORT_DIR/scale.png"
lib_py_venv "$REPO/.tmp/plot-venv" "matplotlib==$MATPLOTLIB_VERSION" ||
  lib_die "could not install matplotlib for the plot"
"$REPO/.tmp/plot-venv/bin/python" scripts/scale_report.py "$OUT/samples.tsv" "$R" "$PLOT" \
  "$REPORT_DIR/scale-report.md" "$(header)"
progress "report: $REPORT_DIR/scale-report.md, plot: $PLOT"
[[ -n "$CI_RUN" ]] && cat "$REPORT_DIR/scale-report.md"
exit 0

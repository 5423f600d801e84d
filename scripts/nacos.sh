#!/usr/bin/env bash
# Local Nacos-compatible server for tests: one `rnacos` process on loopback.
#
#   bash scripts/nacos.sh install  # install rnacos with cargo if missing (idempotent)
#   bash scripts/nacos.sh up       # install if missing, start (idempotent); last stdout line = 127.0.0.1:<http port>
#   bash scripts/nacos.sh status   # pid + ports; exit 0 iff running and healthy
#   bash scripts/nacos.sh down     # stop exactly the process in our PID file, remove its data
#
# Environment:
#   PRESENCE_NACOS_PORT           HTTP port (default 18848); gRPC = HTTP+1000, console = HTTP+2000
#   PRESENCE_NACOS_DIR            data dir (default <repo>/.tmp/nacos): PID file, log, database
#   PRESENCE_NACOS_WAIT_SECS      bound for the readiness wait in `up` (default 60)
#   PRESENCE_NACOS_INSTALL        1 (default): `cargo install rnacos` when missing; 0: fail instead
#   PRESENCE_NACOS_INSTANCE_TIMEOUT_SECS
#                                 how long an instance without heartbeats lives (default 10).
#                                 Instances registered over gRPC (nacos-sdk) go as soon as their
#                                 connection closes; this bounds the rest.
#   PRESENCE_RNACOS_VERSION       version to install (default 0.8.8, the one tested)
#
# Several servers can run side by side with different PRESENCE_NACOS_DIR / PRESENCE_NACOS_PORT.
# Installing rnacos builds it from crates.io: about 10 minutes on 2 cores, done once (into
# ${CARGO_HOME:-~/.cargo}/bin), serialized by a lock so concurrent callers build it only once.
# Logs go to stderr; only the address goes to stdout.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
LIB_LOG_TAG=nacos
PORT="${PRESENCE_NACOS_PORT:-18848}"
DATA_DIR="${PRESENCE_NACOS_DIR:-$REPO_ROOT/.tmp/nacos}"
WAIT_SECS="${PRESENCE_NACOS_WAIT_SECS:-60}"
INSTALL="${PRESENCE_NACOS_INSTALL:-1}"
INSTANCE_TIMEOUT="${PRESENCE_NACOS_INSTANCE_TIMEOUT_SECS:-10}"
RNACOS_VERSION="${PRESENCE_RNACOS_VERSION:-0.8.8}"
CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
HOST=127.0.0.1

num() { [[ "$1" =~ ^[0-9]+$ ]]; }
num "$PORT" || lib_die "PRESENCE_NACOS_PORT must be a number, got '$PORT'"
num "$WAIT_SECS" || lib_die "PRESENCE_NACOS_WAIT_SECS must be a number, got '$WAIT_SECS'"
if ! num "$INSTANCE_TIMEOUT" || ((INSTANCE_TIMEOUT < 2)); then
    lib_die "PRESENCE_NACOS_INSTANCE_TIMEOUT_SECS must be a number >= 2, got '$INSTANCE_TIMEOUT'"
fi
((PORT >= 1024 && PORT + 2000 <= 65535)) || lib_die "PRESENCE_NACOS_PORT=$PORT out of range (1024..63535)"
GRPC_PORT=$((PORT + 1000))
CONSOLE_PORT=$((PORT + 2000))
# A heartbeat-less instance turns unhealthy after HEALTH_TIMEOUT and goes after INSTANCE_TIMEOUT.
HEALTH_TIMEOUT=$((INSTANCE_TIMEOUT / 2))

[[ -n "$DATA_DIR" && "$DATA_DIR" != "/" ]] || lib_die "PRESENCE_NACOS_DIR must not be empty or /"
case "$DATA_DIR" in
    /*) ;;
    *) DATA_DIR="$PWD/$DATA_DIR" ;;
esac
DATA_DIR="${DATA_DIR%/}"
PID_FILE="$DATA_DIR/rnacos.pid"
LOG_FILE="$DATA_DIR/rnacos.log"
ENV_FILE="$DATA_DIR/rnacos.env"

# ---------------------------------------------------------------- install

RNACOS_BIN=""
find_rnacos() {
    if command -v rnacos >/dev/null 2>&1; then
        RNACOS_BIN="$(command -v rnacos)"
    elif [[ -x "$CARGO_BIN_DIR/rnacos" ]]; then
        RNACOS_BIN="$CARGO_BIN_DIR/rnacos"
    else
        return 1
    fi
}

ensure_rnacos() {
    find_rnacos && return 0
    [[ "$INSTALL" == 1 ]] ||
        lib_die "rnacos is not installed (PRESENCE_NACOS_INSTALL=$INSTALL); run: cargo install rnacos --locked --version $RNACOS_VERSION"
    command -v cargo >/dev/null 2>&1 || lib_die "rnacos missing and cargo not on PATH to install it"
    # One install at a time, machine-wide; whoever waited finds it installed.
    local lock="${TMPDIR:-/tmp}/presence-rnacos-install.lock"
    exec 8>"$lock"
    lib_log "waiting for the install lock $lock (another install may be running)"
    flock -w 3600 8 || lib_die "could not lock $lock within an hour"
    if find_rnacos; then
        exec 8>&-
        return 0
    fi
    local start=$SECONDS
    lib_log "rnacos missing: cargo install rnacos --locked --version $RNACOS_VERSION (builds from source, ~10 min on 2 cores)"
    if ! cargo install rnacos --locked --version "$RNACOS_VERSION" </dev/null >&2; then
        exec 8>&-
        lib_die "cargo install rnacos failed"
    fi
    exec 8>&-
    hash -r
    find_rnacos || lib_die "rnacos still not found after install (looked on PATH and in $CARGO_BIN_DIR)"
    lib_log "installed $RNACOS_BIN in $((SECONDS - start))s"
}

# ---------------------------------------------------------------- processes

# Is $pid the rnacos we started for DATA_DIR? Guards against PID reuse.
pid_is_ours() {
    local pid="$1" comm cmd
    lib_pid_alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == rnacos* ]] || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmd" == *"$ENV_FILE"* ]]
}

# The PID of our server, if it is alive.
server_pid() {
    local pid
    pid="$(lib_pid_from_file "$PID_FILE")" && pid_is_ours "$pid" || return 1
    echo "$pid"
}

stop_server() {
    local pid
    if pid="$(server_pid)"; then
        lib_log "stopping rnacos pid $pid (port $PORT)"
        lib_stop_pids -t 10 "$pid" || lib_die "rnacos pid $pid still alive after SIGKILL"
    fi
    if [[ -d "$DATA_DIR" ]]; then
        # Keep the last log next to the data dir, for post-mortems.
        if [[ -f "$LOG_FILE" ]]; then cp -f -- "$LOG_FILE" "$DATA_DIR.last.log" 2>/dev/null || true; fi
        rm -rf -- "$DATA_DIR"
    fi
}

# ---------------------------------------------------------------- health

# GET /health on the HTTP port answers 200.
http_healthy() {
    # shellcheck disable=SC2016
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET /health HTTP/1.0\r\nHost: %s:%s\r\nConnection: close\r\n\r\n" "$0" "$1" >&3
        IFS= read -r line <&3 || exit 1
        [[ "$line" == HTTP/1.?" 200"* ]]
    ' "$HOST" "$PORT" 2>/dev/null
}

HEALTH_MSG=""
healthy() {
    server_pid >/dev/null || {
        HEALTH_MSG="no live rnacos from $PID_FILE"
        return 1
    }
    http_healthy || {
        HEALTH_MSG="HTTP $HOST:$PORT does not answer GET /health with 200"
        return 1
    }
    lib_port_open "$HOST" "$GRPC_PORT" || {
        HEALTH_MSG="gRPC $HOST:$GRPC_PORT does not accept connections"
        return 1
    }
    HEALTH_MSG=""
}

# ---------------------------------------------------------------- commands

lock_dir() {
    mkdir -p "$(dirname "$DATA_DIR")"
    exec 9>"$DATA_DIR.lock"
    flock -w 120 9 || lib_die "could not lock $DATA_DIR.lock"
}

cmd_up() {
    ensure_rnacos
    lock_dir
    if healthy; then
        lib_log "rnacos already running and healthy (pid $(server_pid), dir $DATA_DIR)"
        echo "$HOST:$PORT"
        return 0
    fi
    if [[ -d "$DATA_DIR" ]]; then
        lib_log "stale state in $DATA_DIR ($HEALTH_MSG); cleaning it up"
        stop_server
    fi
    local p
    for p in "$PORT" "$GRPC_PORT" "$CONSOLE_PORT"; do
        lib_port_open "$HOST" "$p" && lib_die "port $p on $HOST is already in use by a process we did not start; set PRESENCE_NACOS_PORT"
    done

    mkdir -p "$DATA_DIR/db"
    local settings=(
        "RNACOS_SDK_HOST=$HOST"
        "RNACOS_CONSOLE_HOST=$HOST"
        "RNACOS_HTTP_PORT=$PORT"
        "RNACOS_GRPC_PORT=$GRPC_PORT"
        "RNACOS_HTTP_CONSOLE_PORT=$CONSOLE_PORT"
        "RNACOS_DATA_DIR=$DATA_DIR/db"
        "RNACOS_HTTP_WORKERS=2"
        "RNACOS_RAFT_NODE_ADDR=$HOST:$GRPC_PORT"
        "RNACOS_NAMING_HEALTH_TIMEOUT_SECOND=$HEALTH_TIMEOUT"
        "RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND=$INSTANCE_TIMEOUT"
        "RUST_LOG=${PRESENCE_NACOS_LOG:-warn}"
    )
    # The settings go in the environment (which wins) and in an env file passed with -e, so
    # rnacos never reads a stray .env from its working directory.
    printf '%s\n' "${settings[@]}" >"$ENV_FILE"
    lib_log "starting $RNACOS_BIN on $HOST:$PORT (gRPC $GRPC_PORT, console $CONSOLE_PORT) in $DATA_DIR"
    # The server must not inherit our descriptors (the lock on fd 9, or a pipe of whoever runs
    # us, which would then never see EOF): close everything above stderr, point 0-2 at the log.
    (
        lib_close_fds
        cd "$DATA_DIR"
        exec env "${settings[@]}" "$RNACOS_BIN" -e "$ENV_FILE"
    ) </dev/null >>"$LOG_FILE" 2>&1 &
    local pid=$!
    echo "$pid" >"$PID_FILE"

    local start=$SECONDS deadline=$((SECONDS + WAIT_SECS))
    until healthy; do
        if ! lib_pid_alive "$pid"; then
            tail -n 30 "$LOG_FILE" >&2 2>/dev/null || true
            stop_server
            lib_die "rnacos exited during startup (log above)"
        fi
        if ((SECONDS >= deadline)); then
            lib_log "not ready after ${WAIT_SECS}s: $HEALTH_MSG"
            tail -n 30 "$LOG_FILE" >&2 2>/dev/null || true
            stop_server
            lib_die "rnacos did not become ready"
        fi
        sleep 0.1
    done
    lib_log "rnacos ready (pid $pid) after $((SECONDS - start))s"
    echo "$HOST:$PORT"
}

cmd_down() {
    lock_dir
    stop_server
    lib_log "stopped; removed $DATA_DIR"
}

cmd_status() {
    local pid
    pid="$(server_pid || echo -)"
    printf 'rnacos pid=%s http=%s:%s grpc=%s:%s dir=%s\n' "$pid" "$HOST" "$PORT" "$HOST" "$GRPC_PORT" "$DATA_DIR"
    if healthy; then
        echo "healthy: $HOST:$PORT"
        return 0
    fi
    echo "unhealthy: $HEALTH_MSG"
    return 1
}

case "${1:-}" in
    install)
        ensure_rnacos
        echo "$RNACOS_BIN"
        ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|up|down|status" >&2
        exit 2
        ;;
esac

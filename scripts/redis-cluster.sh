#!/usr/bin/env bash
# Local Redis Cluster for tests: 6 nodes (3 masters + 3 replicas) on loopback.
#
#   bash scripts/redis-cluster.sh up      # start (idempotent); last stdout line = seed URLs
#   bash scripts/redis-cluster.sh status  # role + cluster_state per node; exit 0 iff healthy
#   bash scripts/redis-cluster.sh down    # stop exactly our processes (PID files), remove data
#
# Environment:
#   PRESENCE_REDIS_BASE_PORT  first port (default 7100); nodes use base..base+5
#   PRESENCE_REDIS_DIR        data dir (default <repo>/.tmp/redis-cluster); one subdir per port
#   PRESENCE_REDIS_WAIT_SECS  bound for the health wait in `up` (default 30)
#   PRESENCE_REDIS_TLS_DIR    optional: TLS only (no plaintext port; cluster bus and replication
#                             over TLS, clients must show a certificate), with ca.pem, node.pem
#                             and node.key of that dir (e.g. tests/fixtures/tls); seed URLs are
#                             then rediss://
#
# Several independent clusters can run side by side with different
# PRESENCE_REDIS_DIR / PRESENCE_REDIS_BASE_PORT (e.g. for kill/failover tests).
# redis-server and redis-cli are installed with apt when missing.
# Logs go to stderr; only the seed URL list goes to stdout.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
LIB_LOG_TAG=redis-cluster
BASE_PORT="${PRESENCE_REDIS_BASE_PORT:-7100}"
DATA_DIR="${PRESENCE_REDIS_DIR:-$REPO_ROOT/.tmp/redis-cluster}"
WAIT_SECS="${PRESENCE_REDIS_WAIT_SECS:-30}"
NODES=6
HOST=127.0.0.1
TLS_DIR="${PRESENCE_REDIS_TLS_DIR:-}"
# redis-cli's TLS arguments, and the scheme of the seed URLs.
TLS_CLI=()
SCHEME=redis
if [[ -n "$TLS_DIR" ]]; then
    TLS_DIR="$(cd "$TLS_DIR" && pwd)" || lib_die "PRESENCE_REDIS_TLS_DIR: no such directory"
    TLS_CLI=(--tls --cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/node.pem" --key "$TLS_DIR/node.key")
    SCHEME=rediss
fi

case "$BASE_PORT" in
    '' | *[!0-9]*) lib_die "PRESENCE_REDIS_BASE_PORT must be a number, got '$BASE_PORT'" ;;
esac
# Cluster bus port is port+10000, so the last node's bus port must stay < 65536.
if ((BASE_PORT < 1024 || BASE_PORT + NODES - 1 + 10000 > 65535)); then
    lib_die "PRESENCE_REDIS_BASE_PORT=$BASE_PORT out of range (1024..$((65535 - 10000 - NODES + 1)))"
fi
if ((BASE_PORT <= 6379 && 6379 <= BASE_PORT + NODES - 1)); then
    lib_die "ports $BASE_PORT..$((BASE_PORT + NODES - 1)) would collide with a default Redis on 6379"
fi
[[ -n "$DATA_DIR" && "$DATA_DIR" != "/" ]] || lib_die "PRESENCE_REDIS_DIR must not be empty or /"
case "$DATA_DIR" in
    /*) ;;
    *) DATA_DIR="$PWD/$DATA_DIR" ;;
esac
DATA_DIR="${DATA_DIR%/}"

ports() {
    local i
    for ((i = 0; i < NODES; i++)); do echo $((BASE_PORT + i)); done
}

seed_urls() {
    local p out=""
    for p in $(ports); do out+="${out:+,}$SCHEME://$HOST:$p"; done
    echo "$out"
}

# ---------------------------------------------------------------- install

ensure_redis() {
    lib_apt_ensure redis-server redis-cli -- redis-server redis-tools ||
        lib_die "redis-server/redis-cli missing and not installable with apt; install Redis >= 7 manually"
}

# ---------------------------------------------------------------- processes

# Is $pid the redis-server we started in $dir on $port? Guards against PID reuse.
pid_is_ours() {
    local pid="$1" dir="$2" port="$3" comm cwd cmd
    lib_pid_alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == redis-server* ]] || return 1
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    [[ -n "$cwd" && "$cwd" == "$(cd "$dir" 2>/dev/null && pwd -P)" ]] && return 0
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmd" == *":$port"* ]]
}

# PID of the server recorded for a node dir, if it is still ours and alive.
node_pid() {
    local dir="$1" port="$2" f pid
    for f in "$dir/redis.pid" "$dir/started.pid"; do
        pid="$(lib_pid_from_file "$f")" || continue
        if pid_is_ours "$pid" "$dir" "$port"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

stop_node_dir() {
    local dir="$1" port pid
    port="$(basename "$dir")"
    pid="$(node_pid "$dir" "$port")" || return 0
    lib_log "stopping redis-server pid $pid (port $port)"
    lib_stop_pids -t 10 "$pid" || lib_die "pid $pid (port $port) still alive after SIGKILL"
}

# Stop every node recorded under DATA_DIR (whatever ports it used) and remove its data.
cleanup_all() {
    local d
    [[ -d "$DATA_DIR" ]] || return 0
    for d in "$DATA_DIR"/*/; do
        d="${d%/}"
        [[ -d "$d" ]] || continue
        [[ "$(basename "$d")" =~ ^[0-9]+$ ]] || continue
        stop_node_dir "$d"
    done
    for d in "$DATA_DIR"/*/; do
        d="${d%/}"
        [[ -d "$d" && "$(basename "$d")" =~ ^[0-9]+$ ]] && rm -rf -- "$d"
    done
    rm -f -- "$DATA_DIR/urls" "$DATA_DIR/create.log"
    # Remove the data dir itself only if nothing foreign is left in it.
    rmdir -- "$DATA_DIR" 2>/dev/null || true
}

# ---------------------------------------------------------------- health

rcli() {
    local port="$1"
    shift
    timeout 5 redis-cli "${TLS_CLI[@]}" -h "$HOST" -p "$port" "$@" 2>/dev/null
}

field() { # field NAME  (from INFO / CLUSTER INFO text on stdin)
    tr -d '\r' | sed -n "s/^$1:\(.*\)$/\1/p" | head -n1
}

# Healthy iff: every node is ours and alive, reports cluster_state:ok with all
# slots ok and 6 known nodes; 3 masters each with an online replica; 3 replicas
# with master_link_status:up and no sync in progress.
# Sets HEALTH_MSG to the first problem found.
HEALTH_MSG=""
healthy() {
    local p info cinfo role masters=0 replicas=0 pid
    for p in $(ports); do
        if ! pid="$(node_pid "$DATA_DIR/$p" "$p")"; then
            HEALTH_MSG="node $p: no live redis-server from our PID file"
            return 1
        fi
        cinfo="$(rcli "$p" cluster info)" || {
            HEALTH_MSG="node $p: not answering"
            return 1
        }
        [[ "$(field cluster_state <<<"$cinfo")" == ok ]] || {
            HEALTH_MSG="node $p: cluster_state=$(field cluster_state <<<"$cinfo")"
            return 1
        }
        [[ "$(field cluster_slots_ok <<<"$cinfo")" == 16384 ]] || {
            HEALTH_MSG="node $p: cluster_slots_ok=$(field cluster_slots_ok <<<"$cinfo")"
            return 1
        }
        [[ "$(field cluster_known_nodes <<<"$cinfo")" == "$NODES" ]] || {
            HEALTH_MSG="node $p: cluster_known_nodes=$(field cluster_known_nodes <<<"$cinfo")"
            return 1
        }
        info="$(rcli "$p" info replication)" || {
            HEALTH_MSG="node $p: not answering INFO"
            return 1
        }
        role="$(field role <<<"$info")"
        case "$role" in
            master)
                masters=$((masters + 1))
                if [[ "$info" != *state=online* ]]; then
                    HEALTH_MSG="master $p: no online replica yet"
                    return 1
                fi
                ;;
            slave)
                replicas=$((replicas + 1))
                [[ "$(field master_link_status <<<"$info")" == up ]] || {
                    HEALTH_MSG="replica $p: master_link_status=$(field master_link_status <<<"$info")"
                    return 1
                }
                [[ "$(field master_sync_in_progress <<<"$info")" == 0 ]] || {
                    HEALTH_MSG="replica $p: sync in progress"
                    return 1
                }
                ;;
            *)
                HEALTH_MSG="node $p: role=$role"
                return 1
                ;;
        esac
    done
    if ((masters != NODES / 2 || replicas != NODES / 2)); then
        HEALTH_MSG="expected $((NODES / 2)) masters + $((NODES / 2)) replicas, got $masters + $replicas"
        return 1
    fi
    HEALTH_MSG=""
    return 0
}

# ---------------------------------------------------------------- commands

start_node() {
    local port="$1" dir="$DATA_DIR/$1" pid i listen
    mkdir -p "$dir"
    listen=(--port "$port")
    if [[ -n "$TLS_DIR" ]]; then
        listen=(--port 0 --tls-port "$port" --tls-cert-file "$TLS_DIR/node.pem"
            --tls-key-file "$TLS_DIR/node.key" --tls-ca-cert-file "$TLS_DIR/ca.pem"
            --tls-cluster yes --tls-replication yes)
    fi
    # The daemon must not inherit any of our descriptors (our lock on fd 9, or a
    # pipe of whoever runs us, which would then never see EOF), so start it from
    # a subshell that closes everything above stderr and points 0-2 at a file.
    (
        lib_close_fds
        exec redis-server "${listen[@]}" --bind "$HOST" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1000 \
            --cluster-require-full-coverage no \
            --save "" --appendonly no --repl-diskless-sync-delay 0 \
            --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    ) </dev/null >>"$dir/startup.log" 2>&1 ||
        lib_die "redis-server on port $port failed to start (see $dir/startup.log, $dir/redis.log)"
    # The daemon writes its pidfile shortly after forking; wait for it and for PING.
    for ((i = 0; i < 100; i++)); do
        if [[ -s "$dir/redis.pid" ]]; then
            pid="$(tr -dc '0-9' <"$dir/redis.pid")"
            if [[ -n "$pid" ]] && pid_is_ours "$pid" "$dir" "$port" &&
                [[ "$(rcli "$port" ping)" == PONG ]]; then
                # redis deletes redis.pid on clean shutdown; keep our own copy too.
                echo "$pid" >"$dir/started.pid"
                return 0
            fi
        fi
        sleep 0.1
    done
    tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
    lib_die "redis-server on port $port did not come up within 10 s (see $dir/redis.log)"
}

cmd_up() {
    ensure_redis
    mkdir -p "$(dirname "$DATA_DIR")"
    exec 9>"$DATA_DIR.lock"
    flock -w 120 9 || lib_die "could not lock $DATA_DIR.lock"

    if [[ -d "$DATA_DIR" ]] && healthy; then
        lib_log "cluster already running and healthy in $DATA_DIR"
        seed_urls
        return 0
    fi
    if [[ -d "$DATA_DIR" ]]; then
        lib_log "stale state in $DATA_DIR ($HEALTH_MSG); cleaning it up"
        cleanup_all
    fi

    local p start=$SECONDS
    for p in $(ports); do
        lib_port_open "$HOST" "$p" && lib_die "port $p on $HOST is already in use by a process we did not start; set PRESENCE_REDIS_BASE_PORT"
        lib_port_open "$HOST" $((p + 10000)) && lib_die "cluster bus port $((p + 10000)) on $HOST is already in use; set PRESENCE_REDIS_BASE_PORT"
    done
    mkdir -p "$DATA_DIR"
    lib_log "starting $NODES nodes on $HOST:$BASE_PORT-$((BASE_PORT + NODES - 1)) in $DATA_DIR ($(redis-server --version | cut -d' ' -f1-3))"
    for p in $(ports); do start_node "$p"; done

    local addrs=()
    for p in $(ports); do addrs+=("$HOST:$p"); done
    if ! timeout 60 redis-cli "${TLS_CLI[@]}" --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        </dev/null >"$DATA_DIR/create.log" 2>&1; then
        cat "$DATA_DIR/create.log" >&2
        cleanup_all
        lib_die "redis-cli --cluster create failed"
    fi

    local deadline=$((SECONDS + WAIT_SECS))
    until healthy; do
        if ((SECONDS >= deadline)); then
            lib_log "cluster not healthy after ${WAIT_SECS}s: $HEALTH_MSG"
            for p in $(ports); do
                lib_log "--- tail of $DATA_DIR/$p/redis.log"
                tail -n 10 "$DATA_DIR/$p/redis.log" >&2 2>/dev/null || true
            done
            cleanup_all
            lib_die "cluster did not become healthy"
        fi
        sleep 0.1
    done
    lib_log "cluster healthy after $((SECONDS - start))s"
    seed_urls >"$DATA_DIR/urls"
    seed_urls
}

cmd_down() {
    mkdir -p "$(dirname "$DATA_DIR")"
    exec 9>"$DATA_DIR.lock"
    flock -w 120 9 || lib_die "could not lock $DATA_DIR.lock"
    cleanup_all
    lib_log "stopped; removed $DATA_DIR"
}

cmd_status() {
    command -v redis-cli >/dev/null 2>&1 || lib_die "redis-cli not installed"
    local p pid role state
    for p in $(ports); do
        pid="$(node_pid "$DATA_DIR/$p" "$p" || echo -)"
        role="$(rcli "$p" info replication | field role || true)"
        state="$(rcli "$p" cluster info | field cluster_state || true)"
        printf '%s:%s pid=%s role=%s cluster_state=%s\n' "$HOST" "$p" "$pid" "${role:-down}" "${state:-down}"
    done
    if healthy; then
        echo "healthy: $(seed_urls)"
        return 0
    fi
    echo "unhealthy: $HEALTH_MSG"
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac

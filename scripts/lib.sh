# shellcheck shell=bash
# scripts/lib.sh: helpers shared by the scripts in scripts/. Source it, do not run it:
#
#   # shellcheck source=scripts/lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It is safe under `set -euo pipefail` and without it: it sets no shell option and no trap,
# only defines lib_* functions and LIB_* variables, and its functions report failure through
# their exit status (only lib_die exits). Sourcing it twice is a no-op.
#
# Logging, on stderr, each line prefixed with "[$LIB_LOG_TAG] " (default: the name of the
# running script without .sh):
#   lib_log MSG...                 a line
#   lib_die MSG...                 "ERROR: MSG" and exit 1
# Root and apt (Debian):
#   lib_run_root CMD...            CMD as root (directly, or with passwordless sudo)
#   lib_apt_install PKG...         apt-get install (no recommends); on failure apt-get update
#                                  once and retry
#   lib_apt_ensure CMD... -- PKG...
#                                  install PKGs with apt when a CMD is not on PATH
# Processes, always by their own PID (never pkill -f or killall):
#   lib_spawn LOG CMD...           CMD in the background, stdout+stderr to LOG ("-": inherited);
#                                  its PID in LIB_PID, and appended to LIB_PIDS
#   lib_pid_alive PID              the process exists and is not a zombie
#   lib_pid_from_file FILE         prints the PID a PID file holds (fails if it holds none)
#   lib_stop_pids [-t SECS] PID... SIGTERM, up to SECS (default 15) for them to go, SIGKILL
#                                  the rest, reap our children; fails if one survives
#   lib_stop_all                   lib_stop_pids on LIB_PIDS, then empties it
#   lib_close_fds                  closes every descriptor above 2 (in a subshell about to
#                                  exec a daemon, so it holds no lock or pipe of ours)
# Ports and readiness:
#   lib_free_ports N               N distinct free TCP ports on 127.0.0.1, space-separated
#   lib_port_open HOST PORT        something accepts TCP connections there
#   lib_wait_until SECS CMD...     runs CMD every 0.1 s until it succeeds, at most SECS seconds
#   lib_wait_http URL [SECS]       until GET URL answers 2xx (default 60 s), e.g. .../readyz
#   lib_wait_metric URL LINE [SECS]
#                                  until URL/metrics has the exact line LINE (default 10 s)
[[ -n "${LIB_SH_LOADED:-}" ]] && return 0
LIB_SH_LOADED=1
LIB_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB_PID=""
LIB_PIDS=()

# ------------------------------------------------------------------------------------ logging

lib_log() {
    local tag="${LIB_LOG_TAG:-$(basename "$0" .sh)}"
    printf '[%s] %s\n' "$tag" "$*" >&2
}

lib_die() {
    lib_log "ERROR: $*"
    exit 1
}

# ------------------------------------------------------------------------------------ root, apt

lib_run_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        lib_log "need root (or passwordless sudo) to run: $*"
        return 1
    fi
}

lib_apt_install() {
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
    command -v apt-get >/dev/null 2>&1 || {
        lib_log "no apt-get to install $*"
        return 1
    }
    # Only refresh the package lists when the packages are not installable as they are
    # (a fresh machine with empty lists, or stale lists pointing at removed files).
    lib_run_root "${apt[@]}" install -y --no-install-recommends "$@" >&2 && return 0
    lib_log "apt-get install $* failed; running apt-get update once and retrying"
    lib_run_root "${apt[@]}" update >&2 || {
        lib_log "apt-get update failed"
        return 1
    }
    lib_run_root "${apt[@]}" install -y --no-install-recommends "$@" >&2 || {
        lib_log "apt-get install $* failed"
        return 1
    }
}

lib_apt_ensure() {
    local cmds=() missing=() c
    while (($#)) && [[ "$1" != -- ]]; do
        cmds+=("$1")
        shift
    done
    [[ "${1:-}" == -- ]] && shift
    (($#)) || {
        lib_log "usage: lib_apt_ensure CMD... -- PKG..."
        return 2
    }
    for c in "${cmds[@]}"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    ((${#missing[@]} == 0)) && return 0
    lib_log "${missing[*]} missing: installing $* with apt"
    lib_apt_install "$@" || return 1
    hash -r
    for c in "${missing[@]}"; do
        command -v "$c" >/dev/null 2>&1 || {
            lib_log "$c still not on PATH after installing $*"
            return 1
        }
    done
}

# lib_py_venv VENV PKG==VERSION...: a Python venv at VENV holding exactly those pinned packages
# (recreated when the list changes). Returns 1 (with a message) when python3, venv or pip fails.
lib_py_venv() {
    local venv="$1"
    shift
    local want="$*"
    [[ -x "$venv/bin/python" && "$(cat "$venv/.wanted" 2>/dev/null)" == "$want" ]] && return 0
    command -v python3 >/dev/null 2>&1 || { lib_log "python3 not found"; return 1; }
    lib_log "installing $want into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { lib_log "python3 -m venv failed (Debian: apt-get install python3-venv)"; return 1; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2 || { lib_log "pip install $want failed"; return 1; }
    echo "$want" >"$venv/.wanted"
}

# ------------------------------------------------------------------------------------ processes

lib_spawn() {
    local log="$1"
    shift
    if [[ "$log" == - ]]; then
        "$@" &
    else
        "$@" >"$log" 2>&1 &
    fi
    LIB_PID=$!
    LIB_PIDS+=("$LIB_PID")
}

# Zombies count as gone: PID 1 may reap killed daemons slowly, and they hold nothing.
lib_pid_alive() {
    local stat state
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    state="${stat##*) }"
    state="${state%% *}"
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

lib_pid_gone() { ! lib_pid_alive "$1"; }

lib_pid_from_file() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" ]] || return 1
    echo "$pid"
}

# True while any of the PIDs is alive.
lib_any_alive() {
    local pid
    for pid in "$@"; do
        lib_pid_alive "$pid" && return 0
    done
    return 1
}

lib_stop_pids() {
    local secs=15 pid rc=0
    if [[ "${1:-}" == -t ]]; then
        secs="$2"
        shift 2
    fi
    (($#)) || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    if ! lib_wait_until "$secs" lib_no_alive "$@"; then
        for pid in "$@"; do
            if lib_pid_alive "$pid"; then
                lib_log "pid $pid did not stop within ${secs}s after SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
    fi
    # Reap our children (for any other process `wait` fails at once), then make sure the
    # killed ones are gone.
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        lib_wait_until 5 lib_pid_gone "$pid" || {
            lib_log "pid $pid still alive after SIGKILL"
            rc=1
        }
    done
    return "$rc"
}

lib_no_alive() { ! lib_any_alive "$@"; }

lib_stop_all() {
    local rc=0
    if ((${#LIB_PIDS[@]})); then
        lib_stop_pids "${LIB_PIDS[@]}" || rc=1
    fi
    LIB_PIDS=()
    return "$rc"
}

lib_close_fds() {
    local fd
    for fd in "/proc/$BASHPID/fd/"*; do
        fd="${fd##*/}"
        if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
}

# ------------------------------------------------------------------------------------ ports

lib_free_ports() {
    python3 "$LIB_SH_DIR/chart_checks.py" free-ports "$1"
}

lib_port_open() {
    # shellcheck disable=SC2016 # $0 and $1 are the inner shell's arguments
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

lib_wait_until() {
    local secs="$1" i
    shift
    for ((i = 0; i < secs * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}

lib_http_ok() { curl -sf -m 5 -o /dev/null "$1"; }

lib_wait_http() {
    lib_wait_until "${2:-60}" lib_http_ok "$1"
}

lib_metric_line() {
    local body
    body="$(curl -sf -m 5 "$1/metrics")" || return 1
    grep -qxF -- "$2" <<<"$body"
}

lib_wait_metric() {
    lib_wait_until "${3:-10}" lib_metric_line "$1" "$2"
}

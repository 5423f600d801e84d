#!/usr/bin/env bash
# THE test command: bash scripts/test.sh [cargo test target selection and filters]
#
# Plain `cargo test` needs no outside service: it runs every test that needs none and lists
# the others as ignored (`#[ignore = "needs Redis Cluster: bash scripts/test.sh"]`, `"needs
# rnacos: ..."`). This script provides those services and runs everything, ignored tests
# included, in ONE cargo invocation:
#
#   cargo test --workspace --all-targets --no-fail-fast -- --include-ignored
#
# 1. a fresh Redis Cluster (scripts/redis-cluster.sh: 3 masters + 3 replicas on loopback ports
#    7100-7105, data in .tmp/redis-cluster), always stopped on exit;
# 2. rnacos, the Nacos-compatible server (scripts/nacos.sh install: ~10 min the first time;
#    each Nacos test starts and stops a server of its own).
#
# Nothing is skipped: if a service cannot be installed or started, this fails, on CI
# (CI=true) and off it. An ignored test run without its service fails and says so.
#
# Arguments replace `--all-targets`: `bash scripts/test.sh --test http memory::` runs only
# those tests (still with the services and `--include-ignored`).
#
# Variables the tests read (the first three are set here):
#   PRESENCE_TEST_REDIS_URL        comma-separated seed URLs of the shared Redis Cluster.
#   PRESENCE_TEST_REDIS_DIR        its data dir: PID files in <dir>/<port>/redis.pid, for tests
#                                  that stop one of its nodes (default .tmp/redis-cluster).
#   PRESENCE_TEST_REDIS_BASE_PORT  its first port; nodes use it to + 5 (default 7100: set it
#                                  to test two checkouts side by side).
#   PRESENCE_TEST_NACOS_PORT       optional: HTTP port of the first Nacos test's server (default
#                                  18848; the others use + 10 and + 20; each also uses + 1000 and + 2000).
# (Tests that kill a Redis master or reshard start a cluster of their own, on free ports,
# through scripts/redis-cluster.sh; so does tests/redis_tls.rs, a TLS-only one on 7950-7955
# with the certificates of tests/fixtures/tls: redis-server must be built with TLS, as
# Debian's is.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$PWD"

export PRESENCE_TEST_REDIS_DIR="${PRESENCE_TEST_REDIS_DIR:-$REPO_ROOT/.tmp/redis-cluster}"
export PRESENCE_TEST_REDIS_BASE_PORT="${PRESENCE_TEST_REDIS_BASE_PORT:-7100}"

cluster() {
    PRESENCE_REDIS_DIR="$PRESENCE_TEST_REDIS_DIR" \
        PRESENCE_REDIS_BASE_PORT="$PRESENCE_TEST_REDIS_BASE_PORT" \
        bash "$REPO_ROOT/scripts/redis-cluster.sh" "$@"
}

# shellcheck disable=SC2317  # invoked via trap
stop_cluster() {
    cluster down || echo "scripts/test.sh: WARNING: stopping the Redis cluster failed" >&2
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Always start from an empty cluster so no state leaks between runs.
cluster down

echo "scripts/test.sh: starting Redis Cluster${CI:+ (CI=true)} in $PRESENCE_TEST_REDIS_DIR" >&2
if ! urls="$(cluster up | tail -n 1)" || [[ "$urls" != redis://* ]]; then
    echo "scripts/test.sh: ERROR: the Redis Cluster could not be started; the tests need it." >&2
    echo "scripts/test.sh: (see the messages above; this fails the run)" >&2
    exit 1
fi
export PRESENCE_TEST_REDIS_URL="$urls"
echo "scripts/test.sh: PRESENCE_TEST_REDIS_URL=$PRESENCE_TEST_REDIS_URL" >&2

echo "scripts/test.sh: ensuring rnacos (Nacos-compatible server; first install ~10 min)" >&2
if ! bash scripts/nacos.sh install >/dev/null; then
    echo "scripts/test.sh: ERROR: rnacos could not be installed; the Nacos tests need it." >&2
    exit 1
fi

if [ $# -eq 0 ]; then
    set -- --all-targets
fi
cargo test --workspace --no-fail-fast "$@" -- --include-ignored

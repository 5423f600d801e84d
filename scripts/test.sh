#!/usr/bin/env bash
# THE test command: bash scripts/test.sh [extra cargo test args]
#
# Starts a fresh local Redis Cluster (scripts/redis-cluster.sh), runs every test
# target against it, and always stops the cluster on exit. There is no silent
# skip: if Redis cannot be installed or the cluster cannot start, this fails.
#
# Four passes: (1) every target, the HTTP suite on the Redis Cluster store;
# (2) the Redis fault tests (tests/redis_faults.rs, ignored by a plain `cargo test`:
# they SIGSTOP a master of the shared cluster, so they run alone, and wait for the
# cluster to heal before they end); (3) the HTTP suite on the embedded in-memory
# store; (4) the HTTP suite through a cluster of 3 shards and 2 gateways
# (PRESENCE_TEST_TOPOLOGY=cluster). All always run; the exit code is that of the
# first pass that failed.
#
# Exported to the tests:
#   PRESENCE_TEST_REDIS_URL        comma-separated seed URLs of the shared cluster
#   PRESENCE_TEST_REDIS_DIR        its data dir (PID files: <dir>/<port>/redis.pid)
#   PRESENCE_TEST_REDIS_BASE_PORT  its first port (nodes use base..base+5)
#   PRESENCE_TEST_REDIS_SCRIPT     absolute path of scripts/redis-cluster.sh, for tests
#                                  that start their own cluster (other dir + ports)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$PWD"
CLUSTER_SCRIPT="$REPO_ROOT/scripts/redis-cluster.sh"

export PRESENCE_TEST_REDIS_DIR="${PRESENCE_TEST_REDIS_DIR:-$REPO_ROOT/.tmp/redis-cluster}"
export PRESENCE_TEST_REDIS_BASE_PORT="${PRESENCE_TEST_REDIS_BASE_PORT:-7100}"
export PRESENCE_TEST_REDIS_SCRIPT="$CLUSTER_SCRIPT"

cluster() {
    PRESENCE_REDIS_DIR="$PRESENCE_TEST_REDIS_DIR" \
        PRESENCE_REDIS_BASE_PORT="$PRESENCE_TEST_REDIS_BASE_PORT" \
        bash "$CLUSTER_SCRIPT" "$@"
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

echo "scripts/test.sh: starting Redis Cluster (${CI:+CI=true, }dir $PRESENCE_TEST_REDIS_DIR)" >&2
if ! urls="$(cluster up | tail -n 1)" || [[ "$urls" != redis://* ]]; then
    echo "scripts/test.sh: ERROR: the Redis Cluster could not be started; the tests need it." >&2
    echo "scripts/test.sh: (see the messages above; on CI this fails the run)" >&2
    exit 1
fi
export PRESENCE_TEST_REDIS_URL="$urls"
echo "scripts/test.sh: PRESENCE_TEST_REDIS_URL=$PRESENCE_TEST_REDIS_URL" >&2

echo "scripts/test.sh: ensuring rnacos (Nacos-compatible server; first install ~10 min)" >&2
bash scripts/nacos.sh install >/dev/null

set +e
# Everything, with the HTTP suite on the Redis Cluster store (tests/cluster.rs starts clusters
# of shards and gateways of its own on it)...
cargo test --all-targets --no-fail-fast "$@"
rc=$?
# ...the Redis fault tests, alone on the cluster...
cargo test --no-fail-fast --test redis_faults "$@" -- --ignored
rc_faults=$?
# ...the HTTP suite once more on the embedded in-memory store...
PRESENCE_TEST_HTTP_STORE=memory cargo test --no-fail-fast --test http "$@"
rc2=$?
# ...and once more through a cluster: every server of the suite is 3 shards and 2 gateways
# (separate processes, static discovery) on the Redis Cluster, requests alternate gateways.
PRESENCE_TEST_TOPOLOGY=cluster cargo test --no-fail-fast --test http "$@"
rc3=$?
set -e
echo "scripts/test.sh: exit codes: all targets $rc, Redis faults $rc_faults, HTTP on memory $rc2, HTTP through a cluster $rc3" >&2
for code in "$rc" "$rc_faults" "$rc2" "$rc3"; do
    if [ "$code" -ne 0 ]; then exit "$code"; fi
done
exit 0

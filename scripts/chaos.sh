#!/usr/bin/env bash
# The chaos suite (tests/chaos, docs/chaos.md): bash scripts/chaos.sh [scenario filter]
#
# Starts the Redis Cluster the suite needs (as scripts/test.sh does, on ports 7200-7205), runs
# `cargo test --test chaos -- --include-ignored --test-threads 1` and stops the cluster. The
# scenarios start their own nodes, private Redis Clusters and fault proxies, and need root for
# the iptables scenario. .ci/run runs it after scripts/test.sh: see docs/chaos.md for the state
# of each scenario.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# The iptables scenario cuts a Redis master off with iptables: install it where it is missing.
# Under CI=true a failed install fails the run (the scenario would fail anyway); elsewhere the
# scenario says how to install it and skips.
if ! lib_apt_ensure iptables -- iptables; then
    [[ "${CI:-}" == true ]] && lib_die "iptables is needed by the chaos suite and could not be installed"
    lib_log "iptables missing: the iptables scenario will be skipped"
fi
export PRESENCE_TEST_REDIS_DIR="${PRESENCE_TEST_REDIS_DIR:-$PWD/.tmp/chaos-redis}"
export PRESENCE_TEST_REDIS_BASE_PORT="${PRESENCE_TEST_REDIS_BASE_PORT:-7200}"
cluster() {
    PRESENCE_REDIS_DIR="$PRESENCE_TEST_REDIS_DIR" PRESENCE_REDIS_BASE_PORT="$PRESENCE_TEST_REDIS_BASE_PORT" \
        bash scripts/redis-cluster.sh "$@"
}
trap 'cluster down || true' EXIT
cluster down
urls="$(cluster up | tail -n 1)"
[[ "$urls" == redis://* ]] || lib_die "the Redis Cluster could not be started"
export PRESENCE_TEST_REDIS_URL="$urls"
cargo test --test chaos -- --include-ignored --test-threads 1 --nocapture "$@"

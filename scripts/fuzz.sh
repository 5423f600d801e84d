#!/usr/bin/env bash
# Fuzzes a running node: the REST API with schemathesis, driven by docs/openapi.yaml, and the
# WebSocket with scripts/ws_fuzz.py.
#
#   bash scripts/fuzz.sh
#
# Installs schemathesis and websockets (pinned, from PyPI) into a venv, .tmp/fuzz-venv, builds the
# service (PRESENCE_BIN: a prebuilt binary instead) and starts one all-in-one node on a free
# loopback port with the embedded memory store, PRESENCE_AUTH=jwt (a random HS256 secret) and a
# service token (scope presence:service: it may act for any user, so writes to random userIds
# are not 403). Then:
#   1. schemathesis run docs/openapi.yaml, every REST operation but the WebSocket upgrade (not a
#      REST operation: the WebSocket fuzzer covers it), all phases (examples, coverage, fuzzing,
#      stateful), positive and negative data, with the checks not_a_server_error,
#      status_code_conformance, content_type_conformance, response_headers_conformance and
#      response_schema_conformance. Passes with at least FUZZ_MIN_CASES (10000) cases, no 5xx,
#      no failure.
#   2. scripts/ws_fuzz.py: 50 sockets x 100 random messages (valid types with random and huge
#      values, unknown types, random JSON, truncated JSON, binary, invalid UTF-8, frames over
#      64 KiB, pings) and 100 raw connections cut mid-frame or sending broken frames. Passes when
#      the node is still alive, /livez answers 200 and a fresh socket gets welcome + a reply.
#   3. The node never panicked (its log has no "panicked at") and exits cleanly on SIGTERM.
# Prints the figures: cases run, 5xx count, WebSocket messages sent, close codes.
#
# Knobs: FUZZ_MAX_EXAMPLES (per operation and phase, default 1000: about 11,000 cases), FUZZ_SEED (schemathesis and
# ws_fuzz seed; default random, printed), FUZZ_MIN_CASES (10000), FUZZ_WS_SOCKETS (50),
# FUZZ_WS_MESSAGES (100).
# A dependency that cannot be installed fails the run under CI=true, and skips (loudly, exit 0)
# otherwise.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=scripts/k8s-tools.sh
source scripts/k8s-tools.sh # build_service

SCHEMATHESIS_VERSION=4.32.5
WEBSOCKETS_VERSION=17.4
VENV="$REPO/.tmp/fuzz-venv"
WORK="$REPO/.tmp/fuzz"
CI="${CI:-}"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-1000}"
MIN_CASES="${FUZZ_MIN_CASES:-10000}"
SEED="${FUZZ_SEED:-$((RANDOM * 32768 + RANDOM))}"
WS_SOCKETS="${FUZZ_WS_SOCKETS:-50}"
WS_MESSAGES="${FUZZ_WS_MESSAGES:-100}"
started=$SECONDS

section() { printf '\n==== fuzz: %s\n' "$*"; }

missing() {
    if [[ "$CI" == true ]]; then
        lib_die "$* (a missing dependency fails under CI=true)"
    fi
    lib_log "SKIP: $* (a failure under CI=true)"
    echo "fuzz: 0 passed, 0 failed, 1 skipped"
    exit 0
}

section "tools"
lib_py_venv "$VENV" "schemathesis==$SCHEMATHESIS_VERSION" "websockets==$WEBSOCKETS_VERSION" ||
    missing "could not install schemathesis and websockets into $VENV"
PY="$VENV/bin/python"
echo "  $("$VENV/bin/schemathesis" --version 2>&1 | head -n 1), websockets $("$PY" -c 'import websockets; print(websockets.__version__)')"

BIN="$(build_service)" || lib_die "cargo build of the service failed"
echo "  service: $BIN"

rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck disable=SC2317 # invoked via trap
cleanup() { lib_stop_all || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section "node"
read -r PORT < <(lib_free_ports 1)
SECRET="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
BASE="http://127.0.0.1:$PORT"
# PRESENCE_STATUS_RATE=off: the fuzzer changes the same few users' status thousands of times a
# minute; 429 is documented and conforms, but it would hide the 200 path. PRESENCE_WS_RATE at
# its maximum so the WebSocket fuzzer's messages are processed, not cut at 50/s with 1008.
lib_spawn "$WORK/node.log" env PRESENCE_LISTEN="127.0.0.1:$PORT" PRESENCE_AUTH=jwt \
    PRESENCE_JWT_SECRET="$SECRET" PRESENCE_STATUS_RATE=off PRESENCE_WS_RATE=100000 \
    RUST_LOG="${RUST_LOG:-warn}" "$BIN"
NODE_PID="$LIB_PID"
lib_wait_http "$BASE/livez" 60 || {
    tail -n 20 "$WORK/node.log" >&2
    lib_die "the node did not answer $BASE/livez within 60 s"
}
# An HS256 service token, valid for 2 hours (hand-rolled: no JWT library needed).
TOKEN="$(SECRET="$SECRET" "$PY" - <<'EOF'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "1", "aud": "presence", "exp": int(time.time()) + 7200,
                       "scope": "presence:service"}).encode())
sig = hmac.new(os.environ["SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
EOF
)"
code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$BASE/api/v1/presence/statuses")"
[[ "$code" == 200 ]] || lib_die "the service token is refused: GET /statuses answered $code"
echo "  node pid $NODE_PID on $BASE (PRESENCE_AUTH=jwt, memory store); service token accepted"

failed=0

# ------------------------------------------------------------------------------------------
section "1. schemathesis: docs/openapi.yaml, $MAX_EXAMPLES examples per operation and phase, seed $SEED"
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
st_rc=0
# From $WORK: schemathesis keeps a cache (.schemathesis/) in its working directory.
# One worker: schemathesis's workers are threads, and CPython 3.11's `ast` module (which its
# case generation calls) can fail with "SystemError: AST constructor recursion depth mismatch"
# when two threads parse at once (python/cpython#106905); it failed a CI run that way with
# every case passed and no 5xx. Same cases and checks, run one after another.
(cd "$WORK" && "$VENV/bin/schemathesis" run "$REPO/docs/openapi.yaml" \
    --url "$BASE" \
    --header "Authorization: Bearer $TOKEN" \
    --exclude-path /api/v1/presence/ws \
    --checks "$CHECKS" \
    --mode all \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 15 \
    --generation-database none \
    --suppress-health-check too_slow,filter_too_much \
    --no-color \
    --report ndjson --report-ndjson-path "$WORK/schemathesis.ndjson" \
    >"$WORK/schemathesis.log" 2>&1) || st_rc=$?
# The summary, not the per-operation progress lines.
sed -n '/SUMMARY\|Summary\|=== FAILURES\|Failures/,$p' "$WORK/schemathesis.log" | head -n 150
# The cases: schemathesis' own count ("N generated"); the responses, by status, from its report.
cases="$(grep -oE '^ *[0-9]+ generated' "$WORK/schemathesis.log" | tr -dc '0-9')"
cases="${cases:-0}"
read -r responses fivexx statuses < <("$PY" - "$WORK/schemathesis.ndjson" <<'EOF'
import collections, json, sys
# Every response schemathesis got: count them by status (a case may make several requests,
# e.g. for a stateful link; each counts once here).
statuses = collections.Counter()
def walk(o):
    if isinstance(o, dict):
        r = o.get("response")
        if isinstance(r, dict) and isinstance(r.get("status_code"), int):
            statuses[r["status_code"]] += 1
        for v in o.values():
            walk(v)
    elif isinstance(o, list):
        for v in o:
            walk(v)
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line:
        walk(json.loads(line))
fivexx = sum(v for k, v in statuses.items() if k >= 500)
print(sum(statuses.values()), fivexx, ",".join(f"{k}:{v}" for k, v in sorted(statuses.items())) or "-")
EOF
)
echo "  schemathesis: exit $st_rc, $cases cases generated, $responses responses checked, $fivexx answered 5xx; by status: $statuses"
if ((st_rc != 0)); then
    echo "  FAIL  schemathesis reported failures or errors (exit $st_rc; full log $WORK/schemathesis.log)"
    failed=$((failed + 1))
elif ((fivexx != 0)); then
    echo "  FAIL  $fivexx answers were 5xx"
    failed=$((failed + 1))
elif ((cases < MIN_CASES)); then
    echo "  FAIL  only $cases cases, fewer than $MIN_CASES"
    failed=$((failed + 1))
else
    echo "  PASS  schemathesis: $cases cases, 0 5xx, every answer conforms to docs/openapi.yaml"
fi

# ------------------------------------------------------------------------------------------
section "2. WebSocket fuzzer: $WS_SOCKETS sockets x $WS_MESSAGES messages, seed $SEED"
if "$PY" scripts/ws_fuzz.py --base "$BASE" --token "$TOKEN" --pid "$NODE_PID" --seed "$SEED" \
    --sockets "$WS_SOCKETS" --messages "$WS_MESSAGES" 2>&1 | tee "$WORK/ws-fuzz.log" | sed 's/^/  /'; then
    echo "  PASS  WebSocket fuzzer: node alive, /livez 200, a fresh socket works"
else
    echo "  FAIL  WebSocket fuzzer (log $WORK/ws-fuzz.log)"
    failed=$((failed + 1))
fi

# ------------------------------------------------------------------------------------------
section "3. no panic, clean exit"
if grep -n 'panicked at' "$WORK/node.log" | head -n 5; then
    echo "  FAIL  the node panicked (log $WORK/node.log)"
    failed=$((failed + 1))
else
    echo "  PASS  no panic in the node's log"
fi
if lib_pid_alive "$NODE_PID"; then
    kill -TERM "$NODE_PID"
    node_rc=0
    wait "$NODE_PID" || node_rc=$?
    if ((node_rc == 0)); then
        echo "  PASS  the node exited 0 on SIGTERM"
    else
        echo "  FAIL  the node exited $node_rc on SIGTERM"
        failed=$((failed + 1))
    fi
else
    echo "  FAIL  the node is not running any more"
    failed=$((failed + 1))
fi

printf '\n==== fuzz: done in %ss\n' "$((SECONDS - started))"
echo "fuzz: $((3 - failed)) passed, $failed failed"
((failed == 0))

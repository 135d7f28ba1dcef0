#!/usr/bin/env bash
# Fuzz the HTTP API from its own OpenAPI document: schemathesis against the live demo server.
#
#   bash .ci/fuzz.sh SCHEMATHESIS BINARY     # what the fuzz stage of .ci/run runs
#
# Two passes, each from a fixed seed with positive and negative data (about 60 cases per
# operation and phase): the default server, then one with --api-key (the key sent, so the
# protected routes are fuzzed past the 401). Checks: not_a_server_error,
# status_code_conformance, content_type_conformance, response_schema_conformance. The server
# must then exit 0 on SIGTERM and its log must hold no panic. Reports (NDJSON, one per pass)
# land in target/fuzz/. Exit status: 0 only when all of that held.
#
# A small --max-model-len keeps generations short, so a pass takes about a minute on 2 cores.
set -euo pipefail

ST=${1:?usage: fuzz.sh SCHEMATHESIS BINARY}
BINARY=${2:?usage: fuzz.sh SCHEMATHESIS BINARY}
SEED=${MPT_FUZZ_SEED:-20261201}
EXAMPLES=${MPT_FUZZ_EXAMPLES:-60}
PORT=${MPT_FUZZ_PORT:-18600}
REPORTS=target/fuzz
mkdir -p "$REPORTS"

# fuzz_pass NAME [SERVER FLAG...] -- [SCHEMATHESIS FLAG...]
fuzz_pass() {
    local name=$1
    shift
    local server_args=() st_args=()
    while [[ $# -gt 0 && $1 != -- ]]; do server_args+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    st_args=("$@")

    local log="$REPORTS/$name-server.log"
    MPT_SERVER_THREADS=2 "$BINARY" --host 127.0.0.1 --port "$PORT" --max-model-len 256 \
        --max-num-seqs 8 "${server_args[@]}" >"$log" 2>&1 &
    local server=$!
    for _ in $(seq 1 600); do
        curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
        if ! kill -0 "$server" 2>/dev/null; then
            echo "fuzz.sh: the server exited before it was ready:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.5
    done

    local status=0
    rm -rf "$REPORTS/$name"
    "$ST" run "http://127.0.0.1:$PORT/openapi.json" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --mode all --max-examples "$EXAMPLES" --seed "$SEED" --request-timeout 60 \
        --generation-database none --no-color --report ndjson --report-dir "$REPORTS/$name" \
        "${st_args[@]}" || status=$?

    kill -TERM "$server"
    local server_status=0
    wait "$server" || server_status=$?
    if [[ $server_status -ne 0 ]]; then
        echo "fuzz.sh: $name: the server exited with $server_status after SIGTERM" >&2
        status=1
    fi
    if grep -q "panicked" "$log"; then
        echo "fuzz.sh: $name: the server panicked:" >&2
        grep -A5 "panicked" "$log" >&2
        status=1
    fi
    if [[ $status -ne 0 ]]; then
        echo "fuzz.sh: $name FAILED; server log $log:" >&2
        tail -n 40 "$log" >&2
    fi
    return "$status"
}

fuzz_pass open
fuzz_pass api-key --api-key fuzz-key -- --header "Authorization: Bearer fuzz-key"
echo "fuzz.sh: both passes clean (seed $SEED, $EXAMPLES examples per operation)"

#!/usr/bin/env bash
# Soak: the demo server under minutes of constant mixed traffic, then a pass/fail verdict.
#
#   bench/soak.sh                 # 10 minutes at 4 requests/s
#   bench/soak.sh --minutes 2     # the CI stage
#   bench/soak.sh --minutes 30 --output docs/soak-30min.json
#
# Builds mpt-server and mpt-bench (release), starts the bundled demo model on loopback, runs
# `mpt-bench soak` against it (40% streamed, 30% plain, 15% streams abandoned after two events,
# 15% invalid requests of four kinds, from a fixed seed), and checks: every status as expected,
# no request lost or unfinished, KV cache and request gauges at 0 at the end, server RSS growth
# under 10% from the end of a 20 s warm-up. Then SIGTERM, which must end the server with exit 0.
# Exit status: 0 only when all of that held.
#
# Settings: --minutes N (10), --rate R (4), --port P (18500), --output FILE (the verdict as
# JSON), --threads T (2), --max-tokens N (32).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINUTES=10
RATE=4
PORT=18500
OUTPUT=
THREADS=2
MAX_TOKENS=32
while [[ $# -gt 0 ]]; do
    case "$1" in
        --minutes) MINUTES=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --output) OUTPUT=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --max-tokens) MAX_TOKENS=$2; shift 2 ;;
        *) echo "soak.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
# One package per command: built together, cargo would unify their dependencies' features and
# rebuild the server binary CI has just built.
cargo build --release -p mpt-server
cargo build --release -p mpt-bench
LOG=$(mktemp -t mpt-soak-server.XXXXXX.log)
MPT_SERVER_THREADS=$THREADS ./target/release/mpt-server --host 127.0.0.1 --port "$PORT" \
    --max-num-seqs 16 --max-queue-size 64 >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
}
trap cleanup EXIT

for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "soak.sh: the server exited before it was ready:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done

ARGS=(--url "http://127.0.0.1:$PORT/v1/completions" --model mpt-demo --rate "$RATE"
      --duration "$((MINUTES * 60))" --warmup 20 --max-tokens "$MAX_TOKENS" --server-pid "$SERVER")
if [[ -n "$OUTPUT" ]]; then
    ARGS+=(--output "$OUTPUT")
fi
status=0
./target/release/mpt-bench soak "${ARGS[@]}" || status=$?

kill -TERM "$SERVER"
server_status=0
wait "$SERVER" || server_status=$?
if [[ $server_status -ne 0 ]]; then
    echo "soak.sh: the server exited with $server_status after SIGTERM; its log:" >&2
    tail -n 50 "$LOG" >&2
    status=1
fi
if [[ $status -ne 0 ]]; then
    echo "soak.sh: FAILED (server log: $LOG)" >&2
else
    rm -f "$LOG"
    echo "soak.sh: passed"
fi
exit "$status"

#!/usr/bin/env bash
# Structured outputs under load: the same mpt-bench load with and without `--json-schema`, on
# the ~125M MPT shape of bench/make_checkpoint.py (random weights via --load-format dummy:
# speed does not depend on the weight values), plus the TTFT added by grammar compilation.
#
#   bench/structured.sh                 # ~10 min on 2 cores
#
# Writes target/bench/structured/: per-run mpt-bench reports (*.txt, *.json), the server log
# (compile times at debug level) and loadavg.txt. Settings: BENCH_THREADS (2), BENCH_PARALLEL
# (16), BENCH_PORT (18720), BENCH_REQUESTS (32 per throughput run).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/bench/structured}
MODEL=$ROOT/target/bench/mpt-125m-dummy
THREADS=${BENCH_THREADS:-2}
PARALLEL=${BENCH_PARALLEL:-16}
PORT=${BENCH_PORT:-18720}
REQUESTS=${BENCH_REQUESTS:-32}
SCHEMA=$ROOT/bench/json-schema.json
BENCH=$ROOT/target/release/mpt-bench
SERVER=$ROOT/target/release/mpt-server
mkdir -p "$OUT"

# shellcheck source=bench/dummy-server.sh
source "$ROOT/bench/dummy-server.sh"
write_dummy_125m "$MODEL"
(cd "$ROOT" && cargo build --release -q -p mpt-server -p mpt-bench)

start_server() {
  RUST_LOG=info,mpt_engine=debug "$SERVER" --model "$MODEL" --load-format dummy --dtype f32 \
    --threads "$THREADS" --max-num-seqs "$PARALLEL" --host 127.0.0.1 --port "$PORT" \
    >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT" "$OUT/server.log"
}
run() { # name, seed, extra mpt-bench flags...
  local name=$1 seed=$2
  shift 2
  echo "$name: load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/loadavg.txt"
  "$BENCH" run --url "http://127.0.0.1:$PORT/v1/completions" --model mpt-125m-dummy \
    --label "$name" --seed "$seed" --prompt-tokens 128 --no-progress --kv-sample-interval 0 \
    --max-duration 600 --request-timeout 600 "$@" --output "$OUT/$name.json" | tee "$OUT/$name.txt"
}
: >"$OUT/loadavg.txt"
: >"$OUT/server.log"

# TTFT: a fresh server's first constrained request builds the token trie and compiles the
# schema (cold); the next ones find the schema in the cache.
start_server
run ttft-cold 101 --concurrency 1 --num-requests 1 --warmup 0 --output-tokens 8 --json-schema "$SCHEMA"
run ttft-cached 102 --concurrency 1 --num-requests 8 --warmup 0 --output-tokens 8 --json-schema "$SCHEMA"
run ttft-plain 103 --concurrency 1 --num-requests 8 --warmup 0 --output-tokens 8

# Throughput: 16 concurrent streams, unconstrained (128 forced tokens) and JSON schema (the
# schema's outputs are ~128 tokens), twice each, interleaved; different seeds so that no run
# finds another's prompts in the prefix cache.
for round in 1 2; do
  run "plain-$round" $((200 + round)) --concurrency "$PARALLEL" --num-requests "$REQUESTS" \
    --warmup 1 --output-tokens 128
  run "schema-$round" $((300 + round)) --concurrency "$PARALLEL" --num-requests "$REQUESTS" \
    --warmup 1 --output-tokens 128 --json-schema "$SCHEMA"
done
grep -E "grammar compiled|structured outputs ready" "$OUT/server.log" | tee "$OUT/compile.txt"

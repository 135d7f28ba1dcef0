#!/usr/bin/env bash
# Speculative (n-gram) decoding against plain decoding: the same mpt-bench load sent to one
# server started without and one started with --speculative-config, interleaved, twice each.
#
#   bench/speculative.sh                # ~6 min on 2 cores
#
# Workloads: the bundled demo (a trained model that repeats itself) greedy, 400-token outputs,
# at 1 and $BENCH_PARALLEL streams; the demo at temperature 1 (drafts mostly rejected: the
# adaptive back-off has to keep the cost down); the ~125M MPT shape of bench/make_checkpoint.py
# with random weights (--load-format dummy), greedy, whose outputs rarely repeat.
# Writes target/bench/speculative/: per-run reports (*.txt, *.json, the acceptance rate on the
# "speculative decoding" line), loadavg.txt and table.md (speculative vs plain, ratios).
# Settings: BENCH_THREADS (2), BENCH_PARALLEL (16), BENCH_PORT (18730), BENCH_SPEC (the JSON).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/bench/speculative}
MODEL=$ROOT/target/bench/mpt-125m-dummy
THREADS=${BENCH_THREADS:-2}
PARALLEL=${BENCH_PARALLEL:-16}
PORT=${BENCH_PORT:-18730}
SPEC=${BENCH_SPEC:-'{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":3,"prompt_lookup_min":1}'}
BENCH=$ROOT/target/release/mpt-bench
SERVER=$ROOT/target/release/mpt-server
mkdir -p "$OUT"

# shellcheck source=bench/dummy-server.sh
source "$ROOT/bench/dummy-server.sh"
write_dummy_125m "$MODEL"
(cd "$ROOT" && cargo build --release -q -p mpt-server -p mpt-bench)

start_server() { # mode (plain|spec), server flags...
  local mode=$1
  shift
  local extra=()
  [[ $mode == spec ]] && extra=(--speculative-config "$SPEC")
  "$SERVER" "$@" "${extra[@]}" --threads "$THREADS" --max-num-seqs "$PARALLEL" \
    --host 127.0.0.1 --port "$PORT" >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT" "$OUT/server.log"
}
# One workload on both servers, plain first then speculative, twice: name, model name,
# server flags (one string), mpt-bench flags...
pair() {
  local name=$1 model=$2 flags=$3
  shift 3
  for round in 1 2; do
    for mode in plain spec; do
      # shellcheck disable=SC2086 # the flags string is split on purpose
      start_server "$mode" $flags
      echo "$name-$mode-$round: load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/loadavg.txt"
      "$BENCH" run --url "http://127.0.0.1:$PORT/v1/completions" --model "$model" \
        --label "$mode" --seed 7 --no-progress --kv-sample-interval 0 --max-duration 600 \
        --request-timeout 600 "$@" --output "$OUT/$name-$mode-$round.json" \
        | tee "$OUT/$name-$mode-$round.txt"
      stop_server
    done
  done
}
: >"$OUT/loadavg.txt"
: >"$OUT/server.log"

pair demo-greedy mpt-demo "" --concurrency "1,$PARALLEL" --num-requests 32 \
  --prompt-tokens 32 --output-tokens 400
pair demo-t1 mpt-demo "" --concurrency "1,$PARALLEL" --num-requests 32 \
  --prompt-tokens 32 --output-tokens 200 --temperature 1.0
pair dummy125m-greedy mpt-125m-dummy "--model $MODEL --load-format dummy --dtype f32" \
  --concurrency "1,$PARALLEL" --num-requests 16 --prompt-tokens 128 --output-tokens 128

args=()
for name in demo-greedy demo-t1 dummy125m-greedy; do
  for round in 1 2; do
    args+=(--candidate "$OUT/$name-spec-$round.json" --baseline "$OUT/$name-plain-$round.json")
  done
done
"$BENCH" compare "${args[@]}" --output "$OUT/table.md"

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
mkdir -p "$OUT" "$MODEL"

# The shape of bench/make_checkpoint.py's default (d_model 768, 12 heads, 12 layers).
cat >"$MODEL/config.json" <<'JSON'
{"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 768, "n_heads": 12,
 "n_layers": 12, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
 "no_bias": true, "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-05,
 "logit_scale": null, "learned_pos_emb": true, "tie_word_embeddings": true,
 "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
   "attn_type": "multihead_attention", "attn_uses_sequence_id": false, "clip_qkv": null,
   "prefix_lm": false, "qk_ln": false, "softmax_scale": null}}
JSON
cp "$ROOT/crates/engine/assets/demo/tokenizer.json" "$MODEL/tokenizer.json"
(cd "$ROOT" && cargo build --release -q -p mpt-server -p mpt-bench)

SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT INT TERM
start_server() { # mode (plain|spec), server flags...
  local mode=$1
  shift
  local extra=()
  [[ $mode == spec ]] && extra=(--speculative-config "$SPEC")
  "$SERVER" "$@" "${extra[@]}" --threads "$THREADS" --max-num-seqs "$PARALLEL" \
    --host 127.0.0.1 --port "$PORT" >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 120); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/ready" && return 0
    sleep 1
  done
  echo "server not ready: see $OUT/server.log" >&2
  exit 1
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

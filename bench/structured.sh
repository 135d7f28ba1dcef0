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
mkdir -p "$OUT" "$MODEL"

# The shape of bench/make_checkpoint.py's default (d_model 768, 12 heads, 12 layers).
cat >"$MODEL/config.json" <<'EOF'
{"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 768, "n_heads": 12,
 "n_layers": 12, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
 "no_bias": true, "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-05,
 "logit_scale": null, "learned_pos_emb": true, "tie_word_embeddings": true,
 "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
   "attn_type": "multihead_attention", "attn_uses_sequence_id": false, "clip_qkv": null,
   "prefix_lm": false, "qk_ln": false, "softmax_scale": null}}
EOF
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
start_server() {
  RUST_LOG=info,mpt_engine=debug "$SERVER" --model "$MODEL" --load-format dummy --dtype f32 \
    --threads "$THREADS" --max-num-seqs "$PARALLEL" --host 127.0.0.1 --port "$PORT" \
    >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 120); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/ready" && return 0
    sleep 1
  done
  echo "server not ready: see $OUT/server.log" >&2
  exit 1
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

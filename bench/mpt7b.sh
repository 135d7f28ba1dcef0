#!/usr/bin/env bash
# MPT-7B's shape on this machine, q8_0 or bf16 weights: peak memory, load time, decode and
# prefill speed.
#
#   bench/mpt7b.sh                  # q8_0; needs target/release/mpt-server and mpt-bench
#   BENCH_WEIGHTS=bf16 bench/mpt7b.sh
#
# Builds an MPT-7B config.json (d_model 4096, 32 heads, 32 layers, vocab 50432) beside the demo's
# tokenizer.json under $BENCH_WORK (default target/bench), serves it with `--load-format dummy`
# (random weights, generated one tensor at a time) and `--quantization q8_0` (quantized as they
# are generated) or `--dtype bf16`, under `/usr/bin/time -v`; sends a few greedy requests with
# mpt-bench (decode: prompt 32 / output 32, one stream; prefill: prompt 448 / output 1; a
# 512-token context and a 0.5 GiB KV cache), stops the server and prints the peak RSS, the load
# time from the log and the speeds. Settings: BENCH_THREADS (2), BENCH_PORT (18300),
# BENCH_WEIGHTS (q8_0, or any --quantization format, or bf16).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${BENCH_WORK:-$ROOT/target/bench}
DIR=$WORK/mpt-7b-shape
PORT=${BENCH_PORT:-18300}
THREADS=${BENCH_THREADS:-2}
WEIGHTS=${BENCH_WEIGHTS:-q8_0}
LOG=$WORK/mpt7b-$WEIGHTS.log
if [[ $WEIGHTS == bf16 ]]; then
  WEIGHT_FLAGS=(--dtype bf16)
else
  WEIGHT_FLAGS=(--quantization "$WEIGHTS")
fi
mkdir -p "$DIR"
cp "$ROOT/crates/engine/assets/demo/tokenizer.json" "$DIR/"
python3 - "$ROOT/crates/engine/assets/demo/config.json" "$DIR/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432, max_seq_len=2048,
         expansion_ratio=4, no_bias=True)
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -v "$ROOT/target/release/mpt-server" --model "$DIR" --load-format dummy \
  "${WEIGHT_FLAGS[@]}" --host 127.0.0.1 --port "$PORT" --threads "$THREADS" \
  --max-model-len 512 --kv-cache-memory 512MiB >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 900); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/ready" && break
  kill -0 $PID 2>/dev/null || { echo "server exited: see $LOG"; exit 1; }
  sleep 1
done
"$ROOT/target/release/mpt-bench" run --url "http://127.0.0.1:$PORT/v1/completions" \
  --model mpt-7b-shape --scenario decode --prompt-tokens 32 --output-tokens 32 \
  --concurrency 1 --num-requests 3 --warmup 1 --seed 1 --no-progress \
  --output "$WORK/mpt7b-$WEIGHTS.json" | tee "$WORK/mpt7b-$WEIGHTS.txt"
"$ROOT/target/release/mpt-bench" run --url "http://127.0.0.1:$PORT/v1/completions" \
  --model mpt-7b-shape --scenario prefill --prompt-tokens 448 --output-tokens 1 \
  --concurrency 1 --num-requests 3 --warmup 1 --seed 1 --no-progress --kv-sample-interval 0 \
  --output "$WORK/mpt7b-$WEIGHTS-prefill.json" | tee "$WORK/mpt7b-$WEIGHTS-prefill.txt"
# $PID is /usr/bin/time; stop the server (its child) so that time prints the peak RSS.
SERVER_PID=$(pgrep -P $PID)
kill -TERM "$SERVER_PID"
wait $PID || true
grep -E "weights by kind|model weights loaded" "$LOG" | sed 's/^.*INFO //'
grep -E "Maximum resident set size" "$LOG"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# Reproduces the mpt-serve vs llama.cpp `llama-server` comparison from package registries alone.
#
#   bench/compare.sh            # everything: checkpoint, llama.cpp build, conversion, both runs
#
# Steps (each skipped when its output already exists under $BENCH_WORK):
#   1. a random-weight ~125M MPT checkpoint (bench/make_checkpoint.py; torch + transformers)
#   2. llama.cpp from the llama-cpp-python sdist on PyPI (vendor/llama.cpp), llama-server built
#      with cmake (CPU, Release; cmake from PyPI when missing) — ~10+ min on 2 cores
#   3. the checkpoint converted to GGUF f32 with the vendored convert_hf_to_gguf.py
#   4. our mpt-server and mpt-bench built (cargo, release)
#   5. each server started alone on loopback with the same threads and parallel sequences, the
#      same mpt-bench load sent to it (same seed → byte-identical requests), then stopped
#   6. a markdown table of ratios (ours vs llama-server) and a chart
#
# Scenarios: decode (prompt 128 / output 128 at 1, 4 and $BENCH_PARALLEL streams; KV waste
# sampled from mpt-serve's /metrics, estimated for llama-server from its fixed 1024 slots per
# sequence), prefill (512 / 1, one stream), overhead (32 / 1, one stream, sequential: TTFT
# minus the server-reported prefill time — mpt-serve's /metrics histogram diffed around each
# request, llama-server's `timings.prompt_ms`).
#
# Settings (environment): BENCH_WORK (default target/bench), BENCH_OUT (default
# $BENCH_WORK/results), BENCH_THREADS (2), BENCH_PARALLEL (16), BENCH_PYTHON (a python with
# tests/fixtures/requirements.txt installed; default .venv-ref, else a new venv), BENCH_PORT_OURS
# (18000), BENCH_PORT_LLAMA (18080), LLAMA_CPP_PYTHON (the pinned sdist version),
# BENCH_ONLY (ours|llama to run one server), BENCH_QUICK=1 (fewer requests: a smoke run),
# BENCH_FORMAT (f32, q8_0 or bf16: the weights both servers serve; for q8_0 and bf16 both load
# the same GGUF file, ours with --model FILE.gguf), BENCH_NO_TORCH=1 (write that GGUF with
# tests/fixtures/make_gguf.py from random weights of the same shape instead of torch +
# llama.cpp's converter; needs `gguf numpy safetensors ml_dtypes` in the python).
# BENCH_LONG (1: also the long-context runs below; only: just them), BENCH_LONG_CHUNK (512).
# Every step has a time limit; every bench level stops by itself (request count + time cap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${BENCH_WORK:-$ROOT/target/bench}
OUT=${BENCH_OUT:-$WORK/results}
THREADS=${BENCH_THREADS:-2}
PARALLEL=${BENCH_PARALLEL:-16}
PORT_OURS=${BENCH_PORT_OURS:-18000}
PORT_LLAMA=${BENCH_PORT_LLAMA:-18080}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
CMAKE_VERSION=4.4.4
MODEL_NAME=mpt-125m
CKPT=$WORK/$MODEL_NAME
FORMAT=${BENCH_FORMAT:-f32}
case $FORMAT in f32|q8_0|bf16) ;; *) echo "BENCH_FORMAT must be f32, q8_0 or bf16" >&2; exit 2;; esac
GGUF=$WORK/$MODEL_NAME-$FORMAT.gguf
SRC=$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON
LLAMA=$SRC/vendor/llama.cpp
BUILD=$WORK/llama-build-$LLAMA_CPP_PYTHON
LLAMA_SERVER=$BUILD/bin/llama-server
BENCH=$ROOT/target/release/mpt-bench
SERVER=$ROOT/target/release/mpt-server

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
mkdir -p "$WORK" "$OUT"
rm -f "$OUT/loadavg.txt"

# ---- python -----------------------------------------------------------------------------------
if [[ -n ${BENCH_PYTHON:-} ]]; then
  PY=$BENCH_PYTHON
elif [[ -x $ROOT/.venv-ref/bin/python ]]; then
  PY=$ROOT/.venv-ref/bin/python
else
  if [[ ! -x $WORK/venv/bin/python ]]; then
    log "creating $WORK/venv (torch from PyPI is large: several GB)"
    python3 -m venv "$WORK/venv"
    timeout 3600 "$WORK/venv/bin/pip" install -q -r "$ROOT/tests/fixtures/requirements.txt"
  fi
  PY=$WORK/venv/bin/python
fi
# The converter's one import beyond the fixtures' stack: gguf-py reads YAML. Pinned; installed
# only when missing.
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  log "installing the converter's dependency pyyaml"
  timeout 900 "$PY" -m pip install -q pyyaml==6.0.3
fi

# ---- 1. checkpoint ----------------------------------------------------------------------------
if [[ ${BENCH_NO_TORCH:-0} != 1 ]]; then
  log "checkpoint: $CKPT"
  timeout 900 "$PY" "$ROOT/bench/make_checkpoint.py" --out "$CKPT"
fi

# ---- 2. llama.cpp source and build --------------------------------------------------------------
if [[ ! -d $LLAMA ]]; then
  log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON sdist from PyPI"
  mkdir -p "$WORK/dl"
  # --no-binary for this package only: with :all: pip would also build its build tools from source.
  timeout 1800 "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$WORK/dl"
  tar xzf "$WORK/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK"
  [[ -d $LLAMA ]] || die "no vendor/llama.cpp in the sdist"
fi
if [[ ! -x $LLAMA_SERVER ]]; then
  CMAKE=$(command -v cmake || true)
  if [[ -z $CMAKE ]]; then
    # cmake from PyPI (a wheel with the binary), in its own small venv.
    CMAKE=$WORK/cmake-venv/bin/cmake
    if [[ ! -x $CMAKE ]]; then
      log "installing cmake==$CMAKE_VERSION from PyPI into $WORK/cmake-venv"
      python3 -m venv "$WORK/cmake-venv"
      timeout 900 "$WORK/cmake-venv/bin/pip" install -q --only-binary :all: "cmake==$CMAKE_VERSION"
    fi
  fi
  log "building llama-server (CPU, Release, -j$THREADS, nice 15): ~10+ min on 2 cores"
  nice -n 15 timeout 600 "$CMAKE" -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$WORK/llama-cmake.log" 2>&1 \
    || die "cmake configure failed: see $WORK/llama-cmake.log"
  nice -n 15 timeout 3600 "$CMAKE" --build "$BUILD" --target llama-server -j "$THREADS" \
    >"$WORK/llama-build.log" 2>&1 || die "llama-server build failed: see $WORK/llama-build.log"
fi

# ---- 3. GGUF ------------------------------------------------------------------------------------
if [[ ! -f $GGUF && ${BENCH_NO_TORCH:-0} == 1 ]]; then
  log "writing a random ~125M MPT as GGUF $FORMAT (make_gguf.py, no torch): $GGUF"
  timeout 1200 "$PY" "$ROOT/tests/fixtures/make_gguf.py" random "$GGUF.tmp" "$FORMAT"
  mv "$GGUF.tmp" "$GGUF"
elif [[ ! -f $GGUF ]]; then
  log "converting to GGUF $FORMAT: $GGUF"
  PYTHONPATH=$LLAMA/gguf-py${PYTHONPATH:+:$PYTHONPATH} timeout 1200 "$PY" \
    "$LLAMA/convert_hf_to_gguf.py" "$CKPT" --outtype "$FORMAT" --outfile "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi
# What our server loads: the checkpoint directory in f32 (as before), else the same GGUF file.
if [[ $FORMAT == f32 && ${BENCH_NO_TORCH:-0} != 1 ]]; then
  OURS_MODEL=(--model "$CKPT" --dtype f32)
elif [[ $FORMAT == bf16 ]]; then
  OURS_MODEL=(--model "$GGUF" --dtype bf16)
else
  OURS_MODEL=(--model "$GGUF" --dtype f32)
fi

# ---- 4. our binaries ----------------------------------------------------------------------------
log "building mpt-server and mpt-bench (release)"
(cd "$ROOT" && timeout 3600 cargo build --release -q -p mpt-server -p mpt-bench)

# ---- 5. the runs ----------------------------------------------------------------------------------
SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT INT TERM

wait_ready() { # port, readiness path (200 once the model is loaded), log file
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null "http://127.0.0.1:$1$2"; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited: see $3"
    sleep 1
  done
  die "server on port $1 not ready after 300 s: see $3"
}

if [[ ${BENCH_QUICK:-0} == 1 ]]; then
  DECODE_REQ=(--num-requests 4); PREFILL_REQ=(--num-requests 3); OVERHEAD_REQ=(--num-requests 5)
  CAP=60
else
  DECODE_REQ=(); PREFILL_REQ=(--num-requests 8); OVERHEAD_REQ=(--num-requests 20); CAP=240
fi
# llama-server's KV: -c $((PARALLEL * 1024)) split over -np $PARALLEL sequences, each holding
# its 1024 slots from start to end (no KV gauge to sample, so waste is estimated from that).
LLAMA_SLOTS_PER_SEQ=1024

run_load() { # label, port, extra decode flags...
  local label=$1 port=$2 dir=$OUT/$1
  shift 2
  mkdir -p "$dir"
  # The machine is shared: record how busy it was, next to the numbers.
  echo "$label: load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/loadavg.txt"
  local common=(--url "http://127.0.0.1:$port/v1/completions" --model "$MODEL_NAME"
    --label "$label" --seed 1 --warmup 2 --max-duration "$CAP" --grace 60
    --request-timeout 300 --no-progress)
  log "$label: decode, prompt 128 / output 128, concurrency 1,4,16"
  "$BENCH" run "${common[@]}" --scenario decode --prompt-tokens 128 --output-tokens 128 \
    --concurrency 1,4,"$PARALLEL" "${DECODE_REQ[@]}" "$@" --output "$dir/decode.json" \
    | tee "$dir/decode.txt"
  log "$label: prefill, prompt 512 / output 1, concurrency 1"
  "$BENCH" run "${common[@]}" --scenario prefill --prompt-tokens 512 --output-tokens 1 \
    --concurrency 1 "${PREFILL_REQ[@]}" --kv-sample-interval 0 --output "$dir/prefill.json" \
    | tee "$dir/prefill.txt"
  log "$label: overhead, prompt 32 / output 1, one request at a time, server prefill subtracted"
  "$BENCH" run "${common[@]}" --scenario overhead --prompt-tokens 32 --output-tokens 1 \
    --concurrency 1 "${OVERHEAD_REQ[@]}" --server-timings --kv-sample-interval 0 \
    --output "$dir/overhead.json" | tee "$dir/overhead.txt"
}

LONG=${BENCH_LONG:-0}
if [[ $LONG != only && ${BENCH_ONLY:-ours} != llama ]]; then
  log "starting mpt-server on 127.0.0.1:$PORT_OURS (threads $THREADS, max-num-seqs $PARALLEL)"
  "$SERVER" "${OURS_MODEL[@]}" --served-model-name "$MODEL_NAME" --host 127.0.0.1 \
    --port "$PORT_OURS" --threads "$THREADS" --max-num-seqs "$PARALLEL" \
    >"$OUT/mpt-server.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT_OURS" /ready "$OUT/mpt-server.log"
  run_load mpt-serve "$PORT_OURS"
  stop_server
fi

if [[ $LONG != only && ${BENCH_ONLY:-llama} != ours ]]; then
  log "starting llama-server on 127.0.0.1:$PORT_LLAMA (threads $THREADS, -np $PARALLEL, -cb)"
  # -c: 1024 tokens of context per parallel sequence (prompt 512 + output, or 128 + 128).
  LLAMA_ARGS=(-m "$GGUF" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$PORT_LLAMA"
    -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" -cb -c $((PARALLEL * LLAMA_SLOTS_PER_SEQ)))
  "$LLAMA_SERVER" "${LLAMA_ARGS[@]}" >"$OUT/llama-server.log" 2>&1 &
  SERVER_PID=$!
  # llama-server segfaults at load on MPT Q8_0 files on some AMX CPUs unless weight repacking
  # is off: detect the early exit and retry with --no-repack (recorded in the results).
  for _ in $(seq 1 20); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    curl -sf -o /dev/null "http://127.0.0.1:$PORT_LLAMA/health" && break
    sleep 1
  done
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "llama-server exited at load; retrying with --no-repack"
    echo "llama-server: exited at load without --no-repack; ran with --no-repack" >>"$OUT/loadavg.txt"
    "$LLAMA_SERVER" "${LLAMA_ARGS[@]}" --no-repack >"$OUT/llama-server.log" 2>&1 &
    SERVER_PID=$!
  fi
  wait_ready "$PORT_LLAMA" /health "$OUT/llama-server.log"
  run_load llama-server "$PORT_LLAMA" --kv-slots-per-seq "$LLAMA_SLOTS_PER_SEQ"
  stop_server
fi

# ---- long contexts (BENCH_LONG=1 adds them, BENCH_LONG=only runs only them) ------------------------
# TTFT against prompt length (one request at a time, 1 output token) on both servers; 8k and 16k
# prompts on ours alone (llama-server stops at the checkpoint's 2048-token training length);
# decode speed at an 8k context; and a short request's TTFT while another request prefills 8k
# tokens (ours with --max-num-batched-tokens $LONG_CHUNK, so chunks interleave).
LONG_CHUNK=${BENCH_LONG_CHUNK:-512}
long_ttft() { # label port lengths...
  local label=$1 port=$2 dir=$OUT/$1/long
  shift 2
  mkdir -p "$dir"
  echo "$label long: load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/loadavg.txt"
  for n in "$@"; do
    local reqs=3 warm=1
    if ((n > 4000)); then reqs=1 warm=0; fi
    log "$label: TTFT, prompt $n / output 1"
    "$BENCH" run --url "http://127.0.0.1:$port/v1/completions" --model "$MODEL_NAME" \
      --label "$label" --seed 3 --warmup "$warm" --max-duration 900 --grace 300 \
      --request-timeout 900 --no-progress --kv-sample-interval 0 --scenario "ttft-$n" \
      --prompt-tokens "$n" --output-tokens 1 --concurrency 1 --num-requests "$reqs" \
      --output "$dir/ttft-$n.json" | tee "$dir/ttft-$n.txt"
  done
}
if [[ $LONG != 0 && ${BENCH_ONLY:-ours} != llama ]]; then
  log "starting mpt-server for long contexts (--max-model-len 16384)"
  "$SERVER" --model "$CKPT" --served-model-name "$MODEL_NAME" --host 127.0.0.1 \
    --port "$PORT_OURS" --threads "$THREADS" --dtype f32 --max-model-len 16384 \
    >"$OUT/mpt-server-long.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT_OURS" /ready "$OUT/mpt-server-long.log"
  long_ttft mpt-serve "$PORT_OURS" 128 512 1024 2000 8000 16000
  log "mpt-serve: decode at an 8k context (prompt 8000 / output 64)"
  "$BENCH" run --url "http://127.0.0.1:$PORT_OURS/v1/completions" --model "$MODEL_NAME" \
    --label mpt-serve --seed 4 --warmup 0 --max-duration 900 --grace 300 --request-timeout 900 \
    --no-progress --kv-sample-interval 0 --scenario decode-8k --prompt-tokens 8000 \
    --output-tokens 64 --concurrency 1 --num-requests 1 \
    --output "$OUT/mpt-serve/long/decode-8k.json" | tee "$OUT/mpt-serve/long/decode-8k.txt"
  stop_server
  log "starting mpt-server with --max-num-batched-tokens $LONG_CHUNK for the interleaving run"
  "$SERVER" --model "$CKPT" --served-model-name "$MODEL_NAME" --host 127.0.0.1 \
    --port "$PORT_OURS" --threads "$THREADS" --dtype f32 --max-model-len 16384 \
    --max-num-batched-tokens "$LONG_CHUNK" >"$OUT/mpt-server-interleave.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT_OURS" /ready "$OUT/mpt-server-interleave.log"
  common_long=(--url "http://127.0.0.1:$PORT_OURS/v1/completions" --model "$MODEL_NAME"
    --label mpt-serve --warmup 0 --max-duration 900 --grace 300 --request-timeout 900
    --no-progress --kv-sample-interval 0 --concurrency 1)
  "$BENCH" run "${common_long[@]}" --seed 5 --scenario prefill-8k-background \
    --prompt-tokens 8000 --output-tokens 1 --num-requests 1 \
    --output "$OUT/mpt-serve/long/background-8k.json" >"$OUT/mpt-serve/long/background-8k.txt" &
  BACKGROUND=$!
  sleep 3 # the long prompt is a few chunks in
  log "mpt-serve: short requests (32 / 1) while an 8k prompt prefills"
  "$BENCH" run "${common_long[@]}" --seed 6 --scenario short-during-8k --prompt-tokens 32 \
    --output-tokens 1 --num-requests 4 --output "$OUT/mpt-serve/long/short-during-8k.json" \
    | tee "$OUT/mpt-serve/long/short-during-8k.txt"
  wait "$BACKGROUND"
  stop_server
fi
if [[ $LONG != 0 && ${BENCH_ONLY:-llama} != ours ]]; then
  log "starting llama-server for long contexts (-np 1 -c 4096)"
  "$LLAMA_SERVER" -m "$GGUF" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$PORT_LLAMA" \
    -t "$THREADS" -tb "$THREADS" -np 1 -c 4096 >"$OUT/llama-server-long.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$PORT_LLAMA" /health "$OUT/llama-server-long.log"
  long_ttft llama-server "$PORT_LLAMA" 128 512 1024 2000
  stop_server
fi
if [[ $LONG != 0 ]]; then
  "$PY" - "$OUT" >"$OUT/long-context.md" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def level(path):
    try:
        return json.loads(path.read_text())["levels"][0]
    except (OSError, KeyError, IndexError, ValueError):
        return None
def p50(lv, key):
    return lv[key]["p50"] if lv and lv.get(key) else None
print("| prompt tokens | mpt-serve TTFT p50 (s) | llama-server TTFT p50 (s) | ratio (>1: mpt-serve faster) |")
print("| ---: | ---: | ---: | ---: |")
for n in [128, 512, 1024, 2000, 8000, 16000]:
    ours = p50(level(out / "mpt-serve/long" / f"ttft-{n}.json"), "ttft_ms")
    theirs = p50(level(out / "llama-server/long" / f"ttft-{n}.json"), "ttft_ms")
    fmt = lambda v: f"{v / 1000:.2f}" if v else "–"
    ratio = f"{theirs / ours:.2f}×" if ours and theirs else ""
    print(f"| {n} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
d = level(out / "mpt-serve/long/decode-8k.json")
if d:
    print(f"\nDecode at an 8k context: TPOT p50 {p50(d, 'tpot_ms'):.1f} ms "
          f"({1000 / p50(d, 'tpot_ms'):.1f} tok/s).")
s = level(out / "mpt-serve/long/short-during-8k.json")
if s:
    t = s["ttft_ms"]
    print(f"Short requests (32 tokens) during an 8k prefill: TTFT p50 {t['p50'] / 1000:.2f} s, "
          f"max {t['max'] / 1000:.2f} s over {t['count']} requests.")
PYEOF
  cat "$OUT/long-context.md"
fi

# ---- 6. the table ---------------------------------------------------------------------------------
# Scenarios both servers have results for (an older results directory may lack one).
PAIRS=()
for scenario in decode prefill overhead; do
  if [[ -f $OUT/mpt-serve/$scenario.json && -f $OUT/llama-server/$scenario.json ]]; then
    PAIRS+=(--candidate "$OUT/mpt-serve/$scenario.json"
      --baseline "$OUT/llama-server/$scenario.json")
  fi
done
if [[ -f $OUT/mpt-serve/decode.json && -f $OUT/llama-server/decode.json ]]; then
  "$BENCH" compare "${PAIRS[@]}" \
    --output "$OUT/comparison.md" --chart "$OUT/benchmark-decode.png"
  {
    echo
    echo "Machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores;" \
      "threads $THREADS, parallel sequences $PARALLEL; weights $FORMAT; llama-cpp-python" \
      "$LLAMA_CPP_PYTHON sdist."
    echo
    sed 's/^/- /' "$OUT/loadavg.txt"
  } >>"$OUT/comparison.md"
  log "table: $OUT/comparison.md, chart: $OUT/benchmark-decode.png"
fi

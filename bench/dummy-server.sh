# Sourced by the bench scripts that serve the ~125M MPT shape of bench/make_checkpoint.py with
# random weights (--load-format dummy: speed does not depend on the weight values). Defines:
#   write_dummy_125m DIR        config.json of that shape and the demo's GPT-NeoX tokenizer.json
#   wait_ready PORT LOG         waits up to 120 s for /ready, else says where to look and exits
#   stop_server                 stops $SERVER_PID (if running) and clears it; trapped on exit

write_dummy_125m() {
  mkdir -p "$1"
  cat >"$1/config.json" <<'JSON'
{"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 768, "n_heads": 12,
 "n_layers": 12, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
 "no_bias": true, "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-05,
 "logit_scale": null, "learned_pos_emb": true, "tie_word_embeddings": true,
 "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
   "attn_type": "multihead_attention", "attn_uses_sequence_id": false, "clip_qkv": null,
   "prefix_lm": false, "qk_ln": false, "softmax_scale": null}}
JSON
  cp "$ROOT/crates/engine/assets/demo/tokenizer.json" "$1/tokenizer.json"
}

wait_ready() {
  for _ in $(seq 1 120); do
    curl -sf -o /dev/null "http://127.0.0.1:$1/ready" && return 0
    sleep 1
  done
  echo "server not ready: see $2" >&2
  exit 1
}

SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT INT TERM

#!/usr/bin/env python3
"""Write a random-weight MPT checkpoint in mosaicml's own layout, for speed comparisons.

Speed does not depend on the weight values, so a random model of the right shape is enough to
compare servers. Default shape: ~125M parameters (d_model 768, 12 heads, 12 layers,
vocab 50432, f32: ~495 MB of weights), the size used in docs/benchmarks.md.

Writes into --out:
  config.json        mosaicml format, from tests/fixtures/generate.py `mpt_config_json`
  model.safetensors  mosaicml tensor names (transformer.wte, transformer.blocks.N.attn.Wqkv, ...),
                     no lm_head (MPT ties it to wte)
  tokenizer.json     GPT-NeoX-20B BPE, copied from the bundled demo model
  tokenizer_config.json  so that `transformers.AutoTokenizer` (used by llama.cpp's converter)
                     finds the tokenizer class

Usage: python bench/make_checkpoint.py --out target/bench/mpt-125m
Needs torch, transformers and safetensors (tests/fixtures/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MptConfig, MptForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from generate import mpt_config_json  # noqa: E402  (the fixtures' config shape, one source)

DEMO_TOKENIZER = ROOT / "crates" / "engine" / "assets" / "demo" / "tokenizer.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-heads", type=int, default=12)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--vocab-size", type=int, default=50432)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    spec = dict(name="bench", d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                vocab_size=args.vocab_size, max_seq_len=args.max_seq_len, dtype="float32")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        existing = json.loads((out / "config.json").read_text())
        if existing == mpt_config_json(spec):
            print(f"{out}: checkpoint already there, kept")
            return

    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = MptConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                    max_seq_len=args.max_seq_len, vocab_size=args.vocab_size,
                    layer_norm_epsilon=1e-5, no_bias=True,
                    attn_config=dict(attn_pdrop=0.0, attn_impl="torch", alibi=True,
                                     alibi_bias_max=8))
    model = MptForCausalLM(cfg).eval()
    state = {
        name: t.detach().to(torch.float32).contiguous().clone()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
    n_params = sum(t.numel() for t in state.values())
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(mpt_config_json(spec), indent=2) + "\n")
    shutil.copyfile(DEMO_TOKENIZER, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPTNeoXTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": args.max_seq_len,
    }, indent=2) + "\n")
    print(f"{out}: {n_params / 1e6:.1f}M parameters, {len(state)} tensors, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

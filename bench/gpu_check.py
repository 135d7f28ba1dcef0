#!/usr/bin/env python3
"""GPU check for mpt-serve, run by bench/gpu-check.sh on a machine with an NVIDIA GPU, torch and
transformers (no Rust toolchain, no network). Usage: gpu_check.py BINARY [--server MPT_SERVER] [--smoke]

(a) Correctness. For random MPT checkpoints with head dims 64, 112 and 128 (the kernels'
    instantiations), transformers' MptForCausalLM in float32 gives the reference logits for every
    prompt position and a greedy continuation. Our binary (examples/gpu_check.rs) runs the same
    prompts on the CPU path (f32) and on the GPU in bf16 with both attention paths (candle tensor
    ops, our CUDA kernels), whole prompts and 64-token chunks mixed with decodes, and once more in
    f32. A bf16 run passes when ||ours - ref|| / ||ref|| <= max(1e-2, 1.5 x transformers' own bf16
    error), an f32 run when it is <= 1e-4; greedy tokens must equal the reference's while its
    top-1/top-2 margin is > 0.05.
(b) Speed. Dummy weights at MPT-7B and MPT-30B shapes: decode ms/step at batch 1, 16, 64 (context
    512) and prefill tokens/s (2048 tokens), each against its floor: weights (+ the KV cache a
    decode step reads) / measured device copy bandwidth, and 2 x params x tokens / measured bf16
    matmul rate. Target: batch-1 decode <= 1.2 x its floor.
(c) The served path (with --server): mpt-server with `--load-format dummy` at MPT-7B shapes on the
    GPU, once per `--attention-kernels` value, the KV pool sized by `--gpu-memory-utilization`
    (its "KV cache pool" log line is printed); a 1500-token prompt and 16 concurrent requests must
    complete, and the device memory in use (all processes) must stay within 0.9 of the card plus
    1 GiB of slack.

--smoke runs everything on the CPU at toy sizes (to test this script where there is no GPU).
Prints a table last; exit status 1 if any correctness check failed (speed is reported, not judged).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import MptConfig, MptForCausalLM

BINARY = sys.argv[1]
SMOKE = "--smoke" in sys.argv
SERVER = sys.argv[sys.argv.index("--server") + 1] if "--server" in sys.argv else None
DEV = "cpu" if SMOKE else "cuda:0"
TORCH_DEV = "cpu" if SMOKE else "cuda"
WORK = Path(tempfile.mkdtemp(prefix="gpu-check-"))
GREEDY = 8
PROMPT_LENGTHS = [1, 7, 33, 120] if SMOKE else [1, 7, 33, 120, 300, 700]
CHECKPOINTS = (
    [dict(d_model=128, n_heads=2, n_layers=2)]  # head dim 64
    if SMOKE
    else [
        dict(d_model=256, n_heads=4, n_layers=2),  # head dim 64
        dict(d_model=896, n_heads=8, n_layers=2),  # head dim 112 (MPT-30B's)
        dict(d_model=512, n_heads=4, n_layers=3),  # head dim 128 (MPT-7B's)
    ]
)
VOCAB = 2048
ROWS: list[tuple[str, str, str, str]] = []  # (check, value, bound, verdict)
FAILED = False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def row(check: str, value: str, bound: str, ok: bool | None) -> None:
    global FAILED
    verdict = "info" if ok is None else ("ok" if ok else "FAIL")
    if ok is False:
        FAILED = True
    ROWS.append((check, value, bound, verdict))
    log(f"{check}: {value} (bound {bound}) {verdict}")


def run_binary(args: list[str], timeout: int = 300) -> str:
    out = subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def mosaic_config(spec: dict) -> dict:
    """config.json in mosaicml's format (what our loader reads; HF's diff-only json omits
    defaults that differ between the two)."""
    return {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt",
        "d_model": spec["d_model"], "n_heads": spec["n_heads"], "n_layers": spec["n_layers"],
        "expansion_ratio": 4, "max_seq_len": 4096, "vocab_size": VOCAB, "no_bias": True,
        "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-5, "logit_scale": None,
        "learned_pos_emb": True, "tie_word_embeddings": True, "torch_dtype": "float32",
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention",
                        "attn_uses_sequence_id": False, "clip_qkv": None, "prefix_lm": False,
                        "qk_ln": False, "softmax_scale": None, "attn_impl": "torch"},
    }


def build_checkpoint(spec: dict, seed: int) -> tuple[Path, MptForCausalLM]:
    torch.manual_seed(seed)
    cfg = MptConfig(d_model=spec["d_model"], n_heads=spec["n_heads"], n_layers=spec["n_layers"],
                    max_seq_len=4096, vocab_size=VOCAB, no_bias=True, layer_norm_epsilon=1e-5,
                    attn_config=dict(attn_pdrop=0.0, attn_impl="torch", alibi=True,
                                     alibi_bias_max=8))
    model = MptForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                continue
            if name.endswith("wte.weight"):
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, (1.5 if "Wqkv" in name else 1.0) / math.sqrt(p.shape[1]))
            else:  # LayerNorm weights away from 1
                p.uniform_(0.5, 1.5)
    path = WORK / f"ckpt-d{spec['d_model']}-h{spec['n_heads']}"
    path.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(mosaic_config(spec), indent=1))
    return path, model


@torch.no_grad()
def reference(model: MptForCausalLM, prompts: list[list[int]], dtype: torch.dtype):
    """All-position logits and greedy tokens with margins, from transformers."""
    m = copy.deepcopy(model).to(TORCH_DEV, dtype)
    logits, greedy, margins = [], [], []
    for p in prompts:
        ids = torch.tensor([p], device=TORCH_DEV)
        logits.append(m(ids).logits[0].float().cpu())
        seq, toks, marg = list(p), [], []
        for _ in range(GREEDY):
            last = m(torch.tensor([seq], device=TORCH_DEV)).logits[0, -1].float()
            top = torch.topk(last, 2).values
            marg.append(float(top[0] - top[1]))
            toks.append(int(last.argmax()))
            seq.append(toks[-1])
        greedy.append(toks)
        margins.append(marg)
    del m
    return logits, greedy, margins


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def correctness() -> None:
    for n, spec in enumerate(CHECKPOINTS):
        hd = spec["d_model"] // spec["n_heads"]
        path, model = build_checkpoint(spec, seed=100 + n)
        gen = torch.Generator().manual_seed(n)
        prompts = [torch.randint(0, VOCAB, (L,), generator=gen).tolist() for L in PROMPT_LENGTHS]
        (WORK / "prompts.json").write_text(json.dumps(prompts))
        ref, ref_greedy, margins = reference(model, prompts, torch.float32)
        ref_bf16, _, _ = reference(model, prompts, torch.bfloat16)
        hf_bf16 = rel(torch.cat(ref_bf16), torch.cat(ref))
        bound = max(1e-2, 1.5 * hf_bf16)
        row(f"hd{hd} transformers bf16 vs f32", f"{hf_bf16:.2e}", "-", None)
        runs = [("cpu", "f32", "cpu", "max")]
        gpu_dtype = "f32" if SMOKE else "bf16"
        for attention in ["tensor"] if SMOKE else ["tensor", "kernels"]:
            runs += [(DEV, gpu_dtype, attention, "max"), (DEV, gpu_dtype, attention, "64")]
            if not SMOKE:  # f32 on the GPU: a tight check of the kernels' indexing and masking
                runs.append((DEV, "f32", attention, "64"))
        outputs = {}
        for device, dtype, attention, chunk in runs:
            name = f"hd{hd} {device} {dtype} {attention} chunk={chunk}"
            out = WORK / f"out-{n}-{device}-{dtype}-{attention}-{chunk}.safetensors"
            args = ["logits", "--model", str(path), "--prompts", str(WORK / "prompts.json"),
                    "--out", str(out), "--device", device, "--dtype", dtype,
                    "--attention", attention, "--greedy", str(GREEDY)]
            if chunk != "max":
                args += ["--chunk", chunk]
            try:
                t = time.time()
                run_binary(args)
                log(f"{name}: ran in {time.time() - t:.1f}s")
            except Exception as e:  # a crash is a failed check, not the end of the script
                row(name, f"error: {str(e).splitlines()[0][:80]}", "-", False)
                print(e, flush=True)
                continue
            got = load_file(str(out))
            outputs[(device, attention, chunk)] = got
            ours = torch.cat([got[f"logits.{i}"] for i in range(len(prompts))])
            err = rel(ours, torch.cat(ref))
            limit = 1e-4 if dtype == "f32" else bound
            row(f"{name}: logits vs transformers f32", f"{err:.2e}", f"{limit:.1e}", err <= limit)
            agree = True
            for i in range(len(prompts)):
                g = got[f"greedy.{i}"].tolist()
                for step, (a, b) in enumerate(zip(g, ref_greedy[i])):
                    if margins[i][step] <= 0.05:
                        break
                    agree &= a == b
            row(f"{name}: greedy vs transformers", "equal" if agree else "differs", "margin>0.05", agree)
            cpu = outputs.get(("cpu", "cpu", "max"))
            if cpu is not None and device != "cpu":
                ours_cpu = torch.cat([cpu[f"logits.{i}"] for i in range(len(prompts))])
                e = rel(ours, ours_cpu)
                row(f"{name}: logits vs our CPU path", f"{e:.2e}", f"{limit:.1e}", e <= limit)


def measure_device() -> tuple[float, float]:
    """Device copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    if SMOKE:
        return 20e9, 1e11
    x = torch.randn(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    bw = 2 * x.numel() * 2 / sorted(times)[len(times) // 2]
    del x, y
    n = 8192
    a_, b_ = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    for _ in range(3):
        a_ @ b_
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(10):
        a_ @ b_
    torch.cuda.synchronize()
    rate = 10 * 2 * n**3 / (time.time() - t)
    del a_, b_
    torch.cuda.empty_cache()
    return bw, rate


def speed() -> None:
    bw, rate = measure_device()
    row("device copy bandwidth", f"{bw / 1e12:.2f} TB/s", "-", None)
    row("bf16 matmul rate", f"{rate / 1e12:.0f} TFLOP/s", "-", None)
    shapes = {
        "mpt-7b": dict(d_model=4096, n_heads=32, n_layers=32),
        "mpt-30b": dict(d_model=7168, n_heads=64, n_layers=48),
    }
    if SMOKE:
        shapes = {"toy": dict(d_model=256, n_heads=4, n_layers=2)}
    batches, context = ("1,4", 64) if SMOKE else ("1,16,64", 512)
    prefill = 128 if SMOKE else 2048
    for label, s in shapes.items():
        cfg = {**mosaic_config(s), "vocab_size": 1000 if SMOKE else 50432, "max_seq_len": 2048}
        cfg_path = WORK / f"{label}.json"
        cfg_path.write_text(json.dumps(cfg))
        kv_per_token = 2 * s["n_layers"] * s["d_model"] * 2  # K and V, bf16
        for attention in ["tensor"] if SMOKE else ["tensor", "kernels"]:
            args = ["bench", "--config", str(cfg_path), "--device", DEV,
                    "--dtype", "f32" if SMOKE else "bf16", "--attention", attention,
                    "--batches", batches, "--context", str(context), "--steps", "16",
                    "--prefill", str(prefill)]
            try:
                t = time.time()
                lines = run_binary(args, timeout=400).splitlines()
                log(f"{label} {attention}: bench ran in {time.time() - t:.0f}s")
            except Exception as e:
                row(f"{label} {attention} bench", f"error: {str(e).splitlines()[0][:80]}", "-", False)
                print(e, flush=True)
                continue
            for line in lines:
                r = json.loads(line)
                wb = r["weight_bytes"]
                params = wb / 2
                if r["kind"] == "decode":
                    b = r["batch"]
                    floor = (wb + b * (context + 8) * kv_per_token) / bw * 1e3
                    ratio = r["ms_per_step"] / floor
                    target = ("" if b != 1 else
                              ", target x1.2 met" if ratio <= 1.2 else ", target x1.2 MISSED")
                    row(f"{label} {attention} decode b={b} ctx={context}",
                        f"{r['ms_per_step']:.2f} ms/step ({r['tokens_per_s']:.0f} tok/s), "
                        f"floor {floor:.2f} ms, x{ratio:.2f}{target}", "-", None)
                else:
                    floor_s = 2 * params * r["tokens"] / rate
                    row(f"{label} {attention} prefill {r['tokens']} tokens",
                        f"{r['tokens_per_s']:.0f} tok/s, floor {r['tokens'] / floor_s:.0f} tok/s, "
                        f"x{r['s'] / floor_s:.2f}", "-", None)


def quantized() -> None:
    """q8_0 through candle's quantized CUDA matmuls: logits against transformers f32 and against
    our CPU q8_0 path (same bytes, so the two differ only by kernel rounding), then the MPT-30B
    shape's decode speed against the q8_0 bytes' bandwidth floor (the A100 40 GB profile)."""
    spec = CHECKPOINTS[0]
    path, model = build_checkpoint(spec, seed=100)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (L,), generator=gen).tolist() for L in PROMPT_LENGTHS]
    (WORK / "prompts-q.json").write_text(json.dumps(prompts))
    ref, _, _ = reference(model, prompts, torch.float32)
    got = {}
    for device, dtype in (("cpu", "f32"), (DEV, "f32" if SMOKE else "bf16")):
        out = WORK / f"out-q8_0-{device}.safetensors"
        try:
            run_binary(["logits", "--model", str(path), "--prompts", str(WORK / "prompts-q.json"),
                        "--out", str(out), "--device", device, "--dtype", dtype,
                        "--attention", "cpu" if device == "cpu" else "tensor",
                        "--greedy", str(GREEDY), "--quantization", "q8_0"])
        except Exception as e:
            row(f"q8_0 {device} logits", f"error: {str(e).splitlines()[0][:80]}", "-", False)
            continue
        t = load_file(str(out))
        got[device] = torch.cat([t[f"logits.{i}"] for i in range(len(prompts))])
        err = rel(got[device], torch.cat(ref))
        row(f"q8_0 {device} {dtype}: logits vs transformers f32", f"{err:.2e}", "5e-2", err <= 5e-2)
    if "cpu" in got and DEV in got and DEV != "cpu":
        e = rel(got[DEV], got["cpu"])
        row(f"q8_0 {DEV} vs our CPU q8_0", f"{e:.2e}", "3e-2", e <= 3e-2)
    bw, _ = measure_device()
    s = dict(d_model=256, n_heads=4, n_layers=2) if SMOKE else dict(d_model=7168, n_heads=64, n_layers=48)
    cfg = {**mosaic_config(s), "vocab_size": 1000 if SMOKE else 50432, "max_seq_len": 2048}
    cfg_path = WORK / "q8_0-shape.json"
    cfg_path.write_text(json.dumps(cfg))
    args = ["bench", "--config", str(cfg_path), "--device", DEV, "--dtype", "f32" if SMOKE else "bf16",
            "--attention", "tensor", "--batches", "1,8", "--context", "512", "--steps", "16",
            "--prefill", "512", "--quantization", "q8_0"]
    try:
        lines = run_binary(args, timeout=900).splitlines()
    except Exception as e:
        row("q8_0 bench", f"error: {str(e).splitlines()[0][:80]}", "-", False)
        return
    for line in lines:
        r = json.loads(line)
        if r["kind"] == "decode":
            floor = r["weight_bytes"] / bw * 1e3
            row(f"q8_0 {'mpt-30b' if not SMOKE else 'toy'} decode b={r['batch']}",
                f"{r['ms_per_step']:.2f} ms/step ({r['tokens_per_s']:.0f} tok/s), weights "
                f"{r['weight_bytes'] / 1e9:.1f} GB, floor {floor:.2f} ms", "-", None)


def word_tokenizer(vocab: int) -> dict:
    """tokenizer.json of a word-level tokenizer: `<|endoftext|>` = 0, then w1, w2, ... (every id
    decodes, so a dummy model's random tokens do too)."""
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<|endoftext|>"},
    }


def http(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    """Status and JSON body ({} when the body is not a JSON object)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        parsed = json.loads(raw or b"{}")
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}


def served() -> None:
    if SERVER is None:
        log("no --server binary given: the served-path check (c) is skipped")
        return
    shape = (dict(d_model=256, n_heads=4, n_layers=2) if SMOKE
             else dict(d_model=4096, n_heads=32, n_layers=32))  # MPT-7B
    vocab = 1000 if SMOKE else 50432
    model = WORK / "served-mpt-7b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {**mosaic_config(shape), "vocab_size": vocab, "max_seq_len": 2048}))
    (model / "tokenizer.json").write_text(json.dumps(word_tokenizer(vocab)))
    if not SMOKE:
        torch.cuda.empty_cache()
    for kernels in ["candle-ops"] if SMOKE else ["candle-ops", "custom"]:
        name = f"server {kernels}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        args = [SERVER, "--model", str(model), "--served-model-name", "dummy",
                "--load-format", "dummy", "--device", DEV, "--attention-kernels", kernels,
                "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "16"]
        if SMOKE:
            args += ["--threads", "2"]
        log_path = WORK / f"server-{kernels}.log"
        env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            t = time.time()
            while time.time() - t < 300 and proc.poll() is None:
                try:
                    if http(f"{base}/ready", timeout=5)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            text = log_path.read_text()
            pool = next((line for line in text.splitlines() if "KV cache pool" in line), "")
            print(pool, flush=True)
            if proc.poll() is not None or "KV cache pool" not in pool:
                row(f"{name}: startup", f"failed: {text[-300:]!r}", "-", False)
                continue
            row(f"{name}: ready", f"{time.time() - t:.1f}s", "-", True)
            sized = "--gpu-memory-utilization" in pool or SMOKE
            row(f"{name}: KV pool", pool.split("KV cache pool", 1)[1].strip()[:150],
                "-" if SMOKE else "sized by --gpu-memory-utilization", sized)
            long_prompt = " ".join(f"w{1 + i % (vocab - 1)}" for i in range(1500))
            status, body = http(f"{base}/v1/completions", {
                "model": "dummy", "prompt": long_prompt, "max_tokens": 16, "ignore_eos": True})
            ok = status == 200 and body.get("usage", {}).get("completion_tokens") == 16
            row(f"{name}: 1500-token prompt", f"HTTP {status}", "200, 16 tokens", ok)
            prompts = [" ".join(f"w{1 + (i * 7 + j) % (vocab - 1)}" for j in range(200))
                       for i in range(16)]
            t = time.time()
            with ThreadPoolExecutor(16) as pool_:
                results = list(pool_.map(lambda p: http(f"{base}/v1/completions", {
                    "model": "dummy", "prompt": p, "max_tokens": 32, "ignore_eos": True}),
                    prompts))
            took = time.time() - t
            ok = all(st == 200 and b.get("usage", {}).get("completion_tokens") == 32
                     for st, b in results)
            row(f"{name}: 16 concurrent requests", f"{16 * 32 / took:.0f} generated tok/s",
                "all 200", ok)
            if not SMOKE:
                free, total = torch.cuda.mem_get_info()
                used = total - free
                gib = 1024**3
                row(f"{name}: device memory in use (all processes)",
                    f"{used / gib:.1f} of {total / gib:.1f} GiB", "0.9 x total + 1 GiB",
                    used <= 0.9 * total + gib)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log(f"{name}: log in {log_path}")


def main() -> int:
    log(f"binary {BINARY}, device {DEV}, work dir {WORK}")
    if not SMOKE:
        log(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    for phase in (correctness, speed, quantized, served):
        try:
            phase()
        except Exception as e:
            row(phase.__name__, f"error: {e}", "-", False)
    print("\n=== gpu-check summary")
    width = max(len(r[0]) for r in ROWS)
    for check, value, bound, verdict in ROWS:
        print(f"{verdict:5} {check:<{width}}  {value}  [{bound}]")
    print("RESULT:", "FAILED" if FAILED else "ok")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

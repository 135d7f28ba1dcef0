#!/usr/bin/env python3
"""Greedy text of the bundled demo model, f32 and Q8_0, in mpt-server and in llama.cpp's
llama-server, from the same GGUF files; prints how much of the text agrees.

  bench/quant_agreement.py --llama-server PATH [--work DIR] [--threads 2]

Steps: the demo checkpoint is converted to GGUF f32 and Q8_0 (tests/fixtures/make_gguf.py,
which writes MPT GGUF as llama.cpp's converter does; needs `gguf numpy safetensors ml_dtypes`),
each (server, file) pair is started alone on loopback and asked for 48 greedy tokens
(temperature 0, EOS ignored) after each of 8 prompts, then stopped. Agreement of two runs is the
share of the reference's text identical before the first difference, averaged over prompts.
llama-server is retried with --no-repack when it dies at load (it segfaults on MPT Q8_0 files
on some AMX CPUs); the output says when that happened.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "KING.\nMy lord,",
    "To be, or not to be",
    "Romeo.\n",
    "O, ",
    "First Citizen:\nBefore we proceed any further,",
    "HAMLET.\nWhat is the matter,",
    "Enter the Duke and his train.\n",
    "Good morrow, sweet",
]
TOKENS = 48


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def wait_ready(proc: subprocess.Popen, port: int, path: str) -> bool:
    for _ in range(600):
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def run(cmd: list[str], port: int, ready: str, log: Path) -> list[str] | None:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_ready(proc, port, ready):
            return None
        texts = []
        for p in PROMPTS:
            body = {"model": "demo", "prompt": p, "max_tokens": TOKENS, "temperature": 0,
                    "ignore_eos": True}
            texts.append(post(port, body)["choices"][0]["text"])
        return texts
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def agreement(reference: list[str], other: list[str]) -> float:
    shares = []
    for a, b in zip(reference, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        shares.append(n / max(len(a), 1))
    return sum(shares) / len(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--server", default=str(ROOT / "target" / "release" / "mpt-server"))
    ap.add_argument("--work", type=Path, default=ROOT / "target" / "bench" / "agreement")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--port", type=int, default=18200)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    demo = ROOT / "crates" / "engine" / "assets" / "demo"
    files = {}
    for t in ("f32", "q8_0"):
        files[t] = a.work / f"demo-{t}.gguf"
        if not files[t].exists():
            subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "make_gguf.py"),
                            "convert", str(demo), str(files[t]), t], check=True)
    results: dict[str, list[str]] = {}
    notes = []
    for t, f in files.items():
        ours = [a.server, "--model", str(f), "--served-model-name", "demo", "--host", "127.0.0.1",
                "--port", str(a.port), "--threads", a.threads]
        got = run(ours, a.port, "/ready", a.work / f"mpt-server-{t}.log")
        if got is None:
            sys.exit(f"mpt-server failed on {f}: see {a.work}/mpt-server-{t}.log")
        results[f"mpt-serve {t}"] = got
        llama = [a.llama_server, "-m", str(f), "--alias", "demo", "--host", "127.0.0.1",
                 "--port", str(a.port), "-t", a.threads, "-c", "2048", "-np", "1"]
        got = run(llama, a.port, "/health", a.work / f"llama-server-{t}.log")
        if got is None:
            notes.append(f"llama-server died loading {f.name}; retried with --no-repack")
            got = run(llama + ["--no-repack"], a.port, "/health", a.work / f"llama-server-{t}-norepack.log")
        if got is None:
            sys.exit(f"llama-server failed on {f}: see {a.work}")
        results[f"llama-server {t}"] = got
    (a.work / "texts.json").write_text(json.dumps(results, indent=1))
    pairs = [
        ("llama-server f32", "llama-server q8_0", "llama.cpp's own f32 vs Q8_0 (the yardstick)"),
        ("llama-server q8_0", "mpt-serve q8_0", "the same Q8_0 file: llama-server vs mpt-serve"),
        ("llama-server f32", "mpt-serve f32", "the same f32 file: llama-server vs mpt-serve"),
        ("mpt-serve f32", "mpt-serve q8_0", "mpt-serve's own f32 vs Q8_0"),
    ]
    print(f"{len(PROMPTS)} prompts x {TOKENS} greedy tokens; share of text identical before the "
          "first difference:")
    for ref, other, what in pairs:
        same = sum(x == y for x, y in zip(results[ref], results[other]))
        print(f"  {what}: {100 * agreement(results[ref], results[other]):.1f}% "
              f"({same}/{len(PROMPTS)} continuations identical)")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()

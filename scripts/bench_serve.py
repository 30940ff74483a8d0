#!/usr/bin/env python
"""Benchmark `llmgen serve` against llama.cpp's own server under load, with one client script.

Both servers serve SmolLM2-135M-Instruct: ours from the llmgen checkpoint imported from the GGUF
(`llmgen import`), llama-server from the GGUF itself (`-t 2 -c 16384 -np 16`: continuous batching
over 16 parallel slots). The same script drives both through the official `openai` client: C
concurrent clients (1, 4, 16), each sending streamed chat requests back to back (the same system
message and a short question: the same prompt tokens on both), every request 128 new tokens
(`ignore_eos`, which both servers accept), greedy. Reported per server and concurrency:
aggregate output tokens/s over the phase, time to first token p50/p95, inter-token latency
p50/p95 (gaps between streamed chunks), and ours / llama.cpp.

Build llama-server from the llama.cpp sources the llama-cpp-python sdist vendors (never a project
dependency; docs/benchmarks.md has the commands), then:

    python scripts/bench_serve.py --model models/smollm2 \
        --gguf ~/.cache/llmgen/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --llama-server /tmp/lcsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

from benchlib import report

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
             "Give me three tips for learning to cook.", "What is a black hole?", "Describe a cat to a child.",
             "Why is the sky blue?", "Suggest a name for a bakery.", "How do vaccines work?",
             "Summarise the plot of Cinderella.", "What does a compiler do?", "Tell me a fun fact about owls.",
             "How can I sleep better?", "What is the Pythagorean theorem?", "Write a short thank-you note.",
             "Plan a picnic menu."]


# Every request names its system message: SmolLM2's own chat template adds a default one (24 tokens) when
# there is none, which llmgen renders and llama-server's built-in ChatML does not, and the two servers
# would then prefill prompts of different lengths (37 tokens against 16 for "What is the capital of France?").
SYSTEM = "You are a helpful assistant."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: openai.OpenAI, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            client.models.list()
            return
        except openai.APIError:
            time.sleep(0.5)
    raise SystemExit(f"{what} was not ready after {timeout} s")


def one_request(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, tokens, prompt = [], 0, 0
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    stream = client.chat.completions.create(model=model, messages=messages,
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens or len(stamps), "prompt_tokens": prompt}


def load(client: openai.OpenAI, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    def worker(c: int) -> list[dict]:
        return [one_request(client, model, QUESTIONS[(c * per_client + i) % len(QUESTIONS)], max_tokens)
                for i in range(per_client)]

    one_request(client, model, "Hello!", 8)  # warm-up (first-call costs out of the figures)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95), "requests": len(results),
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in results) / len(results)}


def run_server(cmd: list[str], model: str, port: int, what: str, args) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        wait_ready(client, proc, what)
        out = {}
        for c in map(int, args.concurrency.split(",")):
            out[c] = load(client, model, c, args.per_client, args.max_tokens)
            print(what, c, {k: round(v, 4) for k, v in out[c].items()}, flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="llmgen checkpoint of SmolLM2 (llmgen import <gguf>)")
    ap.add_argument("--gguf", required=True, help="the SmolLM2 GGUF for llama-server")
    ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after the other")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--llmgen-set", action="append", default=[],
                    help="a --set for llmgen serve (repeatable), e.g. generate.compile=true")
    ap.add_argument("--out", default="bench_out/serve.json")
    args = ap.parse_args()
    max_batch = max(map(int, args.concurrency.split(",")))
    port = free_port()
    ours = run_server([sys.executable, "-m", "llmgen", "serve", "--model", args.model, "--port", str(port),
                       "--max-batch", str(max_batch), "--set", "serve.max_len=1024",
                       *[x for kv in args.llmgen_set for x in ("--set", kv)]],
                      Path(args.model).name, port, "llmgen", args)
    port = free_port()
    theirs = run_server([args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-c", "16384",
                         "-np", str(max_batch), "--port", str(port)], "smollm2", port, "llama-server", args)
    rows = []
    for c in ours:
        a, b = ours[c], theirs[c]
        rows.append(dict(clients=c, ours=a, llama_server=b, tok_s_ratio=round(a["tok_s"] / b["tok_s"], 3),
                         itl_ratio=round(a["itl_p50"] / b["itl_p50"], 3)))
    report(args.out, dict(max_tokens=args.max_tokens, per_client=args.per_client, threads=args.threads,
                          llmgen_set=args.llmgen_set, rows=rows),
           ["clients", "llmgen tok/s", "llama-server tok/s", "ratio", "TTFT p50/p95 ms (llmgen)",
            "TTFT p50/p95 ms (llama-server)", "ITL p50/p95 ms (llmgen)", "ITL p50/p95 ms (llama-server)"],
           [[r["clients"], f"{r['ours']['tok_s']:.1f}", f"{r['llama_server']['tok_s']:.1f}", f"{r['tok_s_ratio']}x",
             f"{r['ours']['ttft_p50'] * 1e3:.0f} / {r['ours']['ttft_p95'] * 1e3:.0f}",
             f"{r['llama_server']['ttft_p50'] * 1e3:.0f} / {r['llama_server']['ttft_p95'] * 1e3:.0f}",
             f"{r['ours']['itl_p50'] * 1e3:.1f} / {r['ours']['itl_p95'] * 1e3:.1f}",
             f"{r['llama_server']['itl_p50'] * 1e3:.1f} / {r['llama_server']['itl_p95'] * 1e3:.1f}"] for r in rows])


if __name__ == "__main__":
    main()

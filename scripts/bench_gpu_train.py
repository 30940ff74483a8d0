#!/usr/bin/env python
"""GPU training throughput: llmgen's trainer against nanoGPT's train.py, side by side in one run.

Both train GPT-2 124M (12 layers, 12 heads, d_model 768, biases, tied head, vocabulary 50,304)
on the same random token stream, batch B x 1024, no gradient accumulation, bf16 autocast,
`torch.compile`, fused AdamW: nanoGPT's own recipe on one GPU, and ours at its defaults
(`mixed_precision: auto` picks bf16 on a GPU that has it) with `train.compile: true`. Tokens/s
is the median over the steps after compilation; MFU is against the bf16 matmul peak measured on
the card (8192^3 products) and, for reference, the datasheet figure passed as --peak-tflops.

nanoGPT is not vendored: pass a checkout with --nanogpt (train.py, model.py, configurator.py),
or leave it out to clone https://github.com/karpathy/nanoGPT into a temp dir.

    python scripts/bench_gpu_train.py --steps 60 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import report
from llmgen.config import build_config
from llmgen.data.shards import WindowSampler
from llmgen.model.transformer import Transformer
from llmgen.train.loop import TrainJob, train

VOCAB, SEQ = 50304, 1024


def measured_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0)


def run_nanogpt(src: Path, work: Path, data: np.ndarray, batch: int, steps: int) -> list[float]:
    """nanoGPT's train.py as its README runs it on one GPU; returns tokens/s per logged step."""
    repo = work / "nanogpt"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns(".git", "data"))
    (repo / "data" / "synthetic").mkdir(parents=True)
    data.tofile(repo / "data" / "synthetic" / "train.bin")
    data[: 200_000].tofile(repo / "data" / "synthetic" / "val.bin")
    cmd = [sys.executable, "train.py", "--dataset=synthetic", f"--batch_size={batch}", f"--block_size={SEQ}",
           "--gradient_accumulation_steps=1", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
           "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1", "--compile=True", "--dtype=bfloat16",
           "--bias=True", "--dropout=0.0", "--device=cuda", f"--out_dir={work / 'nanogpt_out'}"]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    times = [float(m.group(2)) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out.stdout)]
    return [batch * SEQ / (t / 1000) for t in times]


def run_ours(work: Path, data_file: Path, batch: int, steps: int) -> tuple[list[float], float, str]:
    cfg = build_config({"model": {"preset": "gpt2-124m", "vocab_size": VOCAB, "max_seq_len": SEQ},
                        "run_dir": str(work / "ours"),
                        "train": {"max_steps": steps, "batch_size": batch, "seq_len": SEQ, "lr": 6e-4,
                                  "min_lr": 6e-5, "warmup_steps": 10, "log_every": 1, "eval_every": 10 ** 9,
                                  "save_every": 10 ** 9, "compile": True}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    tokens = np.memmap(data_file, dtype=np.uint16, mode="r")
    train(cfg, model, TrainJob("pretrain", WindowSampler(tokens, batch, SEQ, 0), {}, work / "ours"), overwrite=True)
    recs = [json.loads(x) for x in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return rates, model.flops_per_token(SEQ), str(recs[-1].get("loss"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", default=None, help="a nanoGPT checkout (default: git clone into a temp dir)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the median (compilation)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak, for reference")
    ap.add_argument("--out", default="bench_out/gpu_train.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_train.py needs a CUDA GPU; none is visible here")
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_train_"))
    src = Path(args.nanogpt) if args.nanogpt else work / "nanogpt_src"
    if not args.nanogpt:
        subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/karpathy/nanoGPT", str(src)], check=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50257, size=8_000_000, dtype=np.uint16)
    data_file = work / "tokens.bin"
    data.tofile(data_file)
    peak = measured_peak()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s measured", flush=True)

    ours, fpt, loss = run_ours(work, data_file, args.batch_size, args.steps)
    torch.cuda.empty_cache()
    nano = run_nanogpt(src, work, data, args.batch_size, args.steps)
    o, n = statistics.median(ours[args.skip:]), statistics.median(nano[args.skip:])
    rows = [dict(side=name, tok_s=round(r), mfu_measured=round(r * fpt / peak, 3),
                 mfu_datasheet=round(r * fpt / (args.peak_tflops * 1e12), 3)) for name, r in
            (("llmgen (defaults + train.compile)", o), ("nanoGPT train.py (compile, bf16)", n))]
    print(f"ratio llmgen / nanoGPT: {o / n:.2f}x; llmgen's last loss {loss}")
    report(args.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch_size,
                          seq_len=SEQ, steps=args.steps, peak_tflops_measured=round(peak / 1e12), ratio=round(o / n, 3),
                          rows=rows, ours_rates=[round(x) for x in ours], nanogpt_rates=[round(x) for x in nano]),
           ["side", "tokens/s", "MFU (measured peak)", f"MFU ({args.peak_tflops:.0f} TFLOP/s)"],
           [[r["side"], r["tok_s"], f"{r['mfu_measured']:.1%}", f"{r['mfu_datasheet']:.1%}"] for r in rows])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

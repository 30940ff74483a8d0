#!/usr/bin/env python
"""Per-step time of a small training step: llmgen against nanoGPT at the shakespeare-char shape.

nanoGPT's `model.py` (cloned from its public repository into a temp dir, never vendored) with its own
AdamW (`configure_optimizers`) and torch's clipping, and llmgen's model with its own optimizer
(`make_optimizer`; clipping inside its fused step, as the trainer does) and, on the CPU, its fused
RMSNorm/RoPE/attention/SwiGLU/cross-entropy/AdamW kernels, train in the same bare loop (batch, backward, clipping at 1.0, step)
on the same random token windows, alternating step by step so that both see the same machine
noise. Each side keeps its vocabulary (nanoGPT's 65 characters, llmgen's 260 bytes), as the
time-to-quality recipes do. llmgen's variants: its default llama block and its gpt2 block, each with and
without the kernels, and the llama block at nanoGPT's parameter count (SwiGLU width 352, vocabulary 65:
811k parameters to 804k), which tells the block's extra work apart from the loop around it. The real trainer adds ~1 % over this loop (docs/benchmarks.md).
The process keeps freed memory for reuse (`training.keep_freed_memory`, as llmgen's trainer sets it on the
CPU), so nanoGPT's side, in the same process, has it too.

    python scripts/bench_step.py [--nanogpt <clone source>] [--steps 60] [--rounds 3]

`--attention` times the causal attention alone instead: llmgen's kernel against torch's
scaled_dot_product_attention (its flash kernel on the CPU; with the mask, for finetuning's packed rows),
forward and backward, alternating call by call,
at the shakespeare-char shape and at the batch x heads x length x head size of the `small`, `llama-110m` and
longer-context steps.

    python scripts/bench_step.py --attention [--steps 40]
"""

from __future__ import annotations

import argparse
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
from llmgen.data.sft import segment_mask
from llmgen.kernels import training
from llmgen.model import transformer
from llmgen.model.transformer import Transformer
from llmgen.train.loss import LanguageModelLoss
from llmgen.train.optim import fold_clip, make_optimizer

LAYERS, HEADS, WIDTH, BATCH, SEQ = 4, 4, 128, 12, 64


def nanogpt(src: Path):
    sys.path.insert(0, str(src))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=SEQ, vocab_size=65, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, dropout=0.0,
                      bias=False))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    params = list(m.parameters())
    return (lambda x, y: m(x, y)[1]), (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)), opt, 65


def llmgen(arch: str, kernels: bool, **model):
    cfg = build_config({"model": {"preset": None, "arch": arch, "n_layer": LAYERS, "n_head": HEADS, "d_model": WIDTH,
                                  "max_seq_len": SEQ, "vocab_size": 260, **model}, "train": {"lr": 1e-3}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    loss = LanguageModelLoss(model)
    opt = make_optimizer(model, cfg.train, "cpu")
    if kernels:
        print(f"llmgen {arch}: {training.enable(model, loss, opt)}")
    return loss, (lambda: fold_clip(opt, 1.0)), opt, 260  # the trainer's clipping, inside the fused AdamW


ATTENTION_SHAPES = [(12, 4, 64, 32), (16, 6, 128, 64), (4, 12, 128, 64), (4, 6, 256, 64), (2, 6, 512, 64),
                    (1, 12, 1024, 64)]


PACKED = [(8, 256), (4, 512)]  # batch, tokens: finetuning rows with examples packed and padding


def bench_attention(steps: int, out: str) -> None:
    training.enable(Transformer(build_config({"model": {"preset": "tiny", "vocab_size": 64}}).model))  # builds the kernels
    rows, result = [], {"steps": steps, "shapes": {}}
    for B, H, T, D, packed in [(*shape, False) for shape in ATTENTION_SHAPES] + [(s, 6, t, 64, True) for s, t in PACKED]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_() for _ in range(3))  # the model's views
        g = torch.randn(B, H, T, D)
        if packed:  # a finetuning batch: three examples a row and padding, each token seeing its own example
            seg = torch.full((B, T), -1)
            seg[:, :T // 4], seg[:, T // 4:T // 2], seg[:, T // 2:T - T // 8] = 0, 1, 2
            mask = segment_mask(seg)
            sides = {"torch": lambda: transformer.attend(q, k, v, mask, 0.0),
                     "llmgen": lambda: training.attend(q, k, v, mask, 0.0)}
        else:
            sides = {"torch": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                     "llmgen": lambda: torch.ops.llmgen_training.attention_train(q, k, v, D ** -0.5)}
        times = {name: ([], []) for name in sides}
        for i in range(steps + 3):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                y = fn()
                t1 = time.perf_counter()
                y.backward(g)
                t2 = time.perf_counter()
                q.grad = k.grad = v.grad = None
                if i >= 3:
                    times[name][0].append(t1 - t0), times[name][1].append(t2 - t1)
        ms = {name: [statistics.median(t) * 1000 for t in ts] for name, ts in times.items()}
        result["shapes"][f"{B}x{H}x{T}x{D}" + (" packed" if packed else "")] = ms
        rows.append([f"{B} x {H} x {T} x {D}" + (", packed rows (masked)" if packed else ""), *(f"{ms[n][0]:.2f} / {ms[n][1]:.2f}" for n in sides),
                     f"{sum(ms['torch']) / sum(ms['llmgen']):.2f}x"])
    report(out, result, ["batch x heads x tokens x head size", "torch SDPA fwd / bwd (ms)", "llmgen kernel fwd / bwd (ms)",
                         "llmgen speed"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", default="https://github.com/karpathy/nanoGPT",
                    help="where to git clone nanoGPT from (its repository, or a local clone or mirror)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench_out/step.json")
    ap.add_argument("--attention", action="store_true", help="time the attention kernel against torch's, shape by shape")
    args = ap.parse_args()
    training.keep_freed_memory()
    if args.attention:
        return bench_attention(args.steps if args.steps != 60 else 20, args.out.replace("step.json", "attention.json"))
    src = Path(tempfile.mkdtemp(prefix="bench_step_")) / "nanogpt"
    subprocess.run(["git", "clone", "-q", args.nanogpt, str(src)], check=True)

    makers = {"nanoGPT model.py (gpt2 block, no biases)": lambda: nanogpt(src),
              "llmgen llama block (default: fused kernels)": lambda: llmgen("llama", True),
              "llmgen llama block, torch's ops (train.kernels: false)": lambda: llmgen("llama", False),
              "llmgen gpt2 block (biases; fused GELU)": lambda: llmgen("gpt2", True),
              "llmgen gpt2 block, torch's ops": lambda: llmgen("gpt2", False),
              "llmgen llama block at nanoGPT's size (d_ff 352, vocabulary 65)": lambda: llmgen("llama", True, d_ff=352,
                                                                                               vocab_size=65)}
    short = ["nanoGPT", "llama", "llama torch ops", "gpt2", "gpt2 torch ops", "llama 804k"]
    medians = {name: [] for name in makers}
    for r in range(args.rounds):
        sides = {name: make() for name, make in makers.items()}
        times = {name: [] for name in sides}
        rng = np.random.default_rng(r)
        for step in range(args.steps + 10):
            ids = torch.from_numpy(rng.integers(0, 65, (BATCH, SEQ + 1)))
            for name, (fn, clip, opt, _) in sides.items():
                t0 = time.perf_counter()
                loss = fn(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
                loss.backward()
                clip()
                opt.step()
                opt.grad_scale = None  # llmgen's clip factor, used
                opt.zero_grad(set_to_none=True)
                if step >= 10:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        for name in sides:
            medians[name].append(statistics.median(times[name]) * 1000)
        print(f"round {r + 1} (ms/step): " + ", ".join(f"{k} {medians[n][-1]:.1f}" for k, n in zip(short, makers)))
    nano = statistics.median(medians[next(iter(makers))])
    rows, result = [], {"shape": f"{LAYERS} x {WIDTH}, batch {BATCH} x {SEQ}", "steps": args.steps, "sides": {}}
    for name in makers:
        ms = statistics.median(medians[name])
        result["sides"][name] = {"ms_per_step": round(ms, 2), "rounds": [round(m, 2) for m in medians[name]]}
        rows.append([name, f"{ms:.1f}", " / ".join(f"{m:.1f}" for m in medians[name]), f"{nano / ms:.2f}x"])
    report(args.out, result, ["loop", "ms/step (median of rounds)", "rounds", "speed vs nanoGPT"], rows)


if __name__ == "__main__":
    main()

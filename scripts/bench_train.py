#!/usr/bin/env python
"""Benchmark llmgen's training step against a plain PyTorch loop over transformers' Llama.

Both sides train a Llama-shaped model of the same size (our `model.preset`, exported as a
`LlamaForCausalLM` config: same layers, heads, KV heads, MLP width, vocabulary, tied
embeddings), with AdamW, the same batch size, sequence length and token windows, alternating rounds.
Ours is the real trainer at its defaults (`train.mixed_precision: auto`: bf16 autocast where this CPU's
bf16 matmuls measure clearly faster, else fp32); the HF loop runs in fp32 and under bf16 autocast, and the
faster is the anchor (bf16 is skipped where its matmuls are hopelessly slow, and the run says so). MFU is
against the measured matmul peak of the precision each side used. The trainer runs with evaluation and
checkpoints out of the way; tokens/s is read from its metrics. Each HF round runs in a fresh process
(glibc's malloc at its defaults, as a user's loop has it; llmgen's trainer sets it to keep freed memory
for the next step, process-wide); `--hf-same-process` runs it here instead, with that setting.

    python scripts/bench_train.py --presets tiny,small --steps 20 --rounds 3

`--model DIR` trains a checkpoint's network instead, from its weights on both sides (e.g. SmolLM2-135M after
`llmgen import`: the step a full finetune of it takes), at its own vocabulary; with `--lora`, LoRA adapters
through peft on both sides (llmgen's default finetune.lora: r 8, alpha 16, dropout 0.05, the attention
projections), the base frozen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import report
from llmgen.config import LoraConfig, build_config
from llmgen.model.transformer import Transformer
from llmgen.kernels.precision import cpu_name, matmul_speedup
from llmgen.train.distributed import matmul_peak_flops, mixed_precision_mode
from llmgen.data.shards import WindowSampler
from llmgen.interop.hf import ours_to_hf
from llmgen.model.checkpoint import load_weights, read_model_config
from llmgen.model.lora import apply_lora
from llmgen.train.loop import TrainJob, train


def hf_model(mcfg, weights=None, lora=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.d_model, intermediate_size=mcfg.ffn_hidden,
                     num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head,
                     num_key_value_heads=mcfg.n_kv, max_position_embeddings=mcfg.max_seq_len,
                     rope_theta=mcfg.rope_theta, rms_norm_eps=mcfg.norm_eps, tie_word_embeddings=mcfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hc)
    if weights is not None:  # the same weights as ours: our network's, renamed as HF names them
        ours = Transformer(mcfg)
        load_weights(ours, weights)
        missing, unexpected = model.load_state_dict(ours_to_hf(ours.state_dict(), mcfg), strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    if lora:  # llmgen's finetune.lora defaults, under HF's names
        import peft

        lc = LoraConfig()
        model = peft.get_peft_model(model, peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def hf_round(mcfg, weights, lora, data_file, batch, seq_len, steps, lr, precision="fp32"):
    """One round of the HF loop from scratch (model, data): run in a process of its own by default."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = np.fromfile(data_file, dtype=np.uint16 if mcfg.vocab_size <= 65536 else np.uint32)
    return run_hf(hf_model(mcfg, weights, lora), WindowSampler(data, batch, seq_len, 0), steps, lr, precision)


def run_hf(model, sampler, steps, lr, precision="fp32"):
    """The plain loop; `precision` bf16: the forward and the loss under bf16 autocast (the one line a user adds)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = sampler(step, 0, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=x, labels=None)
            loss = torch.nn.functional.cross_entropy(out.logits.view(-1, out.logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def run_ours(model_spec, tokens_dir, steps, batch, seq_len, lr, work, compile_=False, weights=None, lora=False):
    cfg = build_config({"model": model_spec,
                        "run_dir": str(work), "train": {"max_steps": steps, "batch_size": batch, "seq_len": seq_len,
                                                        "lr": lr, "min_lr": lr / 10, "warmup_steps": 2,
                                                        "log_every": 1, "eval_every": 10 ** 9,
                                                        "save_every": 10 ** 9, "compile": compile_}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if weights is not None:
        load_weights(model, weights)
    n_params = model.num_params()
    if lora:
        model = apply_lora(model, LoraConfig())
    flops = model.flops_per_token(seq_len)  # 4 a frozen weight (no weight gradient) where LoRA freezes the base
    tokens = np.fromfile(tokens_dir, dtype=np.uint16 if cfg.model.vocab_size <= 65536 else np.uint32)
    sampler = WindowSampler(tokens, batch, seq_len, 0)
    train(cfg, model, TrainJob("pretrain", sampler, {}, Path(work)), overwrite=True)
    recs = [json.loads(x) for x in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    skip = 3 if compile_ else 1  # the first steps include compilation
    return statistics.median(r["tokens_per_s"] for r in recs[skip:]), n_params, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="ours with train.compile: true")
    ap.add_argument("--model", help="an llmgen checkpoint folder: train its network from its weights instead of presets")
    ap.add_argument("--lora", action="store_true", help="with --model: LoRA adapters on both sides (peft), the base frozen")
    ap.add_argument("--hf-same-process", action="store_true",
                    help="run the HF loop in this process, after llmgen's trainer has set malloc to keep freed memory "
                         "(training.keep_freed_memory), instead of in a fresh process with glibc's defaults")
    ap.add_argument("--out", default="bench_out/train.json")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    cpu = torch.device("cpu")
    ours_precision, why = mixed_precision_mode("auto")  # what llmgen's trainer picks here by default
    ours_precision = "bf16" if ours_precision == "bf16" else "fp32"
    peaks = {"fp32": matmul_peak_flops(cpu)}
    # the HF loop at its best precision here: fp32 and bf16 autocast both run, the faster is the anchor (bf16
    # is left out only where its matmuls are hopeless: a step would take minutes)
    bf16_x = matmul_speedup("cpu", torch.bfloat16)
    hf_precisions = ["fp32"] + (["bf16"] if bf16_x >= 0.5 else [])
    if "bf16" in hf_precisions or ours_precision == "bf16":
        peaks["bf16"] = matmul_peak_flops(cpu, torch.bfloat16)
    print(f"CPU: {cpu_name()}; llmgen's default precision here: {ours_precision} ({why}); HF loop: "
          f"{' and '.join(hf_precisions)}" + ("" if "bf16" in hf_precisions else f" (bf16 autocast skipped: bf16 "
                                                                                  f"matmul {bf16_x:.2f}x fp32)"),
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.model:  # (name, model section, weights)
        mcfg = read_model_config(Path(args.model))[0]
        targets = [(Path(args.model).name, {**dataclasses.asdict(mcfg), "preset": None}, Path(args.model))]
    else:
        targets = [(preset, {"preset": preset, "vocab_size": args.vocab_size, "max_seq_len": max(args.seq_len, 64)}, None)
                   for preset in args.presets.split(",")]
    rows = []
    for name, spec, weights in targets:
        mcfg = build_config({"model": spec}).model
        rng = np.random.default_rng(0)
        # Zipf-like token stream: realistic enough for throughput, identical for both sides
        data = (rng.zipf(1.2, size=2_000_000) % mcfg.vocab_size).astype(np.uint16 if mcfg.vocab_size <= 65536 else np.uint32)
        data_file = work / f"tokens-{name}.bin"
        data.tofile(data_file)
        ours_r, hf_r = [], {p: [] for p in hf_precisions}
        n_params = fpt = None
        for _ in range(args.rounds):
            r, n_params, fpt = run_ours(spec, data_file, args.steps, args.batch_size, args.seq_len, 1e-3,
                                        work / f"run_{name}", args.compile, weights, args.lora)
            ours_r.append(r)
            for p in hf_precisions:
                hf_args = (mcfg, weights, args.lora, data_file, args.batch_size, args.seq_len, args.steps, 1e-3, p)
                if args.hf_same_process:
                    hf_r[p].append(hf_round(*hf_args))
                else:  # glibc's malloc as a user's HF loop has it, not as llmgen's trainer set it in this process
                    with multiprocessing.get_context("spawn").Pool(1) as pool:
                        hf_r[p].append(pool.apply(hf_round, hf_args))
        hf_by = {p: statistics.median(r) for p, r in hf_r.items()}
        best = max(hf_by, key=hf_by.get)
        ours, hf = statistics.median(ours_r), hf_by[best]
        row = dict(preset=name + (" (LoRA)" if args.lora else "") + (" (compiled)" if args.compile else ""),
                   params_m=round(n_params / 1e6, 2), ours_precision=ours_precision, ours_tok_s=round(ours),
                   hf_precision=best, hf_tok_s=round(hf), ratio=round(ours / hf, 2),
                   ours_mfu=round(ours * fpt / peaks[ours_precision], 3), hf_mfu=round(hf * fpt / peaks[best], 3),
                   rounds_ours=[round(x) for x in ours_r],
                   **{f"hf_{p}_tok_s": round(v) for p, v in hf_by.items()},
                   **{f"rounds_hf_{p}": [round(x) for x in r] for p, r in hf_r.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nCPU {cpu_name()}; matmul peak " + ", ".join(f"{p} {v / 1e9:.0f}" for p, v in peaks.items())
          + f" GFLOP/s; batch {args.batch_size} x {args.seq_len}; peak RSS {rss:.0f} MB")
    report(args.out, dict(cpu=cpu_name(), matmul_peak_gflops={p: round(v / 1e9, 1) for p, v in peaks.items()},
                          batch=args.batch_size, seq_len=args.seq_len, steps=args.steps, rounds=args.rounds,
                          peak_rss_mb=round(rss), rows=rows),
           ["preset", "params", "llmgen tok/s (precision)", "HF Llama loop tok/s, fp32 / bf16 autocast", "ratio to HF's best",
            "MFU llmgen", "MFU HF"],
           [[r["preset"], f"{r['params_m']}M", f"{r['ours_tok_s']} ({r['ours_precision']})",
             " / ".join(str(r.get(f"hf_{p}_tok_s", "-")) for p in ("fp32", "bf16")), f"{r['ratio']}x",
             f"{r['ours_mfu']:.1%}", f"{r['hf_mfu']:.1%}"] for r in rows])

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark llmgen's decoding engine against transformers' `generate()` on the same weights.

For each model shape, a randomly initialised llmgen model is exported to a transformers
`LlamaForCausalLM` (the export path users take; logits agree to 1e-4), and both decode greedily
in fp32 on the same prompt, alternating rounds, with EOS disabled on both sides so every run
produces exactly `--new-tokens` tokens. Ours is `Engine.generate` (prefill + KV-cache decode).
`smollm2` uses the real SmolLM2-135M-Instruct when `--smollm2-gguf` is given (else its shape,
random). Batch 8 reports aggregate tokens/s. The bandwidth limit is the measured memory copy
rate divided by the bytes of fp32 weights read per token. A third engine decodes with int8
weight-only quantization (`--quantize int8`); its cost is reported as the change in perplexity
on a fixed text (meaningful for real weights; for random ones it only shows the rounding noise).

    python scripts/bench_generate.py --models tiny,small,smollm2 --new-tokens 200 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import report

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
from llmgen.config import GenerateConfig, ModelConfig, build_config
from llmgen.data.tokenizer import bytes_tokenizer, train_bpe
from llmgen.generate.engine import Engine
from llmgen.model.checkpoint import load_model, save_checkpoint
from llmgen.model.convert import export_hf, import_model
from llmgen.model.transformer import Transformer

SMOLLM2 = dict(preset=None, arch="llama", n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
               max_seq_len=2048, vocab_size=49152, rope_theta=100000.0, tie_embeddings=True)


def mem_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), the ceiling for weight streaming."""
    a = torch.empty(64 << 20, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0))
    return best


def build(name: str, work: Path, gguf: str | None) -> Path:
    if name == "smollm2" and gguf:
        return import_model(gguf)
    tok = bytes_tokenizer()
    tok_dir = work / "tok"
    tok.save(tok_dir)
    if name == "smollm2":
        mcfg = ModelConfig(**SMOLLM2)
    else:
        mcfg = build_config({"model": {"preset": name, "vocab_size": 1024}}).model
    if mcfg.vocab_size > tok.vocab_size:  # a BPE big enough for the model's vocabulary
        tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 50] * 4, 512)
        tok_dir = work / "tok-bpe"
        tok.save(tok_dir)
    torch.manual_seed(0)
    folder = work / f"ckpt-{name}"
    model = Transformer(mcfg)
    save_checkpoint(folder, model, tok_dir, {"step": 0})
    return folder


def time_ours(engine: Engine, prompts: list[list[int]], n: int) -> float:
    p = GenerateConfig(max_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    steps = 0
    for _ in engine._steps(prompts, p, torch.Generator()):
        steps += 1
    assert steps == n
    return len(prompts) * n / (time.perf_counter() - t0)


def ppl(model, ids: torch.Tensor) -> float:
    logits, loss = model(ids[:, :-1], targets=ids[:, 1:])
    return float(loss.exp())


def time_hf(model, prompts: list[list[int]], n: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == n
    return ids.numel() // ids.shape[1] * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small,smollm2")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="second batch size (aggregate tokens/s)")
    ap.add_argument("--smollm2-gguf", default=None)
    ap.add_argument("--variant", choices=["int8", "compile", "none"], default="int8",
                    help="the second llmgen engine: int8 weights, a torch.compile'd decode step, or none")
    ap.add_argument("--out", default="bench_out/generate.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    bw = mem_bandwidth()
    rows, result = [], {"new_tokens": args.new_tokens, "rounds": args.rounds, "mem_bandwidth_GBps": bw / 1e9, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            folder = build(name, work, args.smollm2_gguf)
            lm = load_model(str(folder))
            engine = Engine(lm.model, lm.tokenizer, device="cpu")
            lm8 = load_model(str(folder))  # the second engine: int8 weights, or the compiled decode step
            engine8 = Engine(lm8.model, lm8.tokenizer, device="cpu", quantize="int8" if args.variant == "int8" else None,
                             compile=args.variant == "compile") if args.variant != "none" else None
            text = (SHARED / "wizard_of_oz.txt").read_text()[:4000] if (SHARED / "wizard_of_oz.txt").is_file() else "the cat sat " * 300
            ids = torch.tensor([lm.tokenizer.encode(text)[:min(256, lm.model.cfg.max_seq_len)]])
            ppl32 = ppl(engine.model, ids)
            ppl8 = ppl(engine8.model, ids) if engine8 else float("nan")
            hf = AutoModelForCausalLM.from_pretrained(export_hf(str(folder), work / "hf"), dtype=torch.float32).eval()
            prompt = list(range(3, 19))  # 16 prompt tokens
            n_params = engine.n_params
            weight_bytes = n_params * 4
            for batch in sorted({1, args.batch}):
                prompts = [prompt] * batch
                ours, ours8, theirs = [], [], []
                time_ours(engine, prompts, 8), engine8 and time_ours(engine8, prompts, 8), time_hf(hf, prompts, 8)  # warm-up
                for _ in range(args.rounds):
                    ours.append(time_ours(engine, prompts, args.new_tokens))
                    ours8.append(time_ours(engine8, prompts, args.new_tokens) if engine8 else float("nan"))
                    theirs.append(time_hf(hf, prompts, args.new_tokens))
                o, o8, t = statistics.median(ours), statistics.median(ours8), statistics.median(theirs)
                limit = bw / weight_bytes * batch
                result["models"][f"{name}/b{batch}"] = {
                    "params_M": n_params / 1e6, "ours_tok_s": o, "ours_int8_tok_s": o8, "hf_tok_s": t, "ratio": o / t,
                    "ratio_int8": o8 / t, "bandwidth_limit_tok_s": limit, "ppl_fp32": ppl32, "ppl_int8": ppl8,
                    "ours_rounds": ours, "ours_int8_rounds": ours8, "hf_rounds": theirs}
                rows.append([name, f"{n_params / 1e6:.1f}M", batch, f"{o:.1f}", f"{o8:.1f}", f"{t:.1f}", f"{o / t:.2f}x",
                             f"{o8 / t:.2f}x", f"{o / limit:.0%}", f"{(ppl8 - ppl32) / ppl32:+.2%}"])
                print(f"{name} batch {batch}: ours {o:.1f} tok/s, int8 {o8:.1f}, transformers {t:.1f} tok/s "
                      f"({o / t:.2f}x, int8 {o8 / t:.2f}x), {o / limit:.0%} of the bandwidth limit; "
                      f"ppl {ppl32:.3f} -> {ppl8:.3f} with int8", flush=True)
    v = args.variant
    report(args.out, result, ["model", "params", "batch", "llmgen tok/s", f"llmgen {v} tok/s", "transformers tok/s",
                              "ratio", f"ratio {v}", "% of bandwidth limit (fp32)", f"{v} ppl change"], rows)


if __name__ == "__main__":
    main()

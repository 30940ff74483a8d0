#!/usr/bin/env python
"""Benchmark llmgen's decoding engine against transformers' `generate()` on the same weights.

For each model shape, a randomly initialised llmgen model is exported to a transformers
`LlamaForCausalLM` (the export path users take; logits agree to 1e-4), and both decode greedily
in fp32 on the same prompt, alternating rounds, with EOS disabled on both sides so every run
produces exactly `--new-tokens` tokens. Ours is `Engine.generate` (prefill + KV-cache decode).
`smollm2` uses the real SmolLM2-135M-Instruct when `--smollm2-gguf` is given (else its shape,
random); with `--llama-cpp-python` (a throwaway venv with llama-cpp-python built from source:
docs/benchmarks.md), llama.cpp decodes the same prompt ids from that GGUF at batch 1 with the same
threads, side by side. Batch 8 reports aggregate tokens/s. The bandwidth limit is the measured rate of reading a
buffer the size of the weights as decoding streams them (fp32, or fp16 where the engine packed
them so) divided by those bytes (every token reads every weight once).
A second llmgen engine (`--variant`) decodes with int8 or int4 weights (`--quantize int8|int4`), the
compiled step (`--compile`), or both (`int4+compile`); its cost is reported as the change in
perplexity against the fp32 weights on fixed passages of a text (the mean over passages; meaningful
for real weights; for random ones it only shows the rounding noise). Its "% of limit" counts the
bytes it streams (int4: 0.625 bytes a weight, its int8 head 1.06).

    python scripts/bench_generate.py --models tiny,small,smollm2 --new-tokens 200 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchlib import report

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
from llmgen.config import EngineOptions, GenerateConfig, ModelConfig, build_config
from llmgen.data.tokenizer import bytes_tokenizer, train_bpe
from llmgen.generate.engine import Engine, GenerationStats
from llmgen.generate.scheduler import Request
from llmgen.interop.export import export_hf
from llmgen.kernels.blockwise import BlockLinear
from llmgen.interop.hf import import_model
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer
from llmgen.train.loss import cross_entropy

SMOLLM2 = dict(preset=None, arch="llama", n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
               max_seq_len=2048, vocab_size=49152, rope_theta=100000.0, tie_embeddings=True)


def read_rate(nbytes: int) -> float:
    """Bytes/s of summing a buffer the size of the weights (best of 5): the ceiling for streaming them
    once per token, with whatever share of them this CPU's caches hold."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    a.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
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
    """Aggregate tokens/s of decoding n tokens for every prompt at once through the engine's scheduler."""
    p = GenerateConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    reqs = [Request(list(x), p, set(), []) for x in prompts]
    sched = engine._scheduler(reqs, len(reqs), GenerationStats())
    t0 = time.perf_counter()
    sched.run(reqs)
    assert all(len(r.generated) == n for r in reqs)
    return len(prompts) * n / (time.perf_counter() - t0)


LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[4]), seed=0, verbose=False)
ids, n, rates = json.loads(sys.argv[2]), int(sys.argv[3]), []
for _ in range(int(sys.argv[5]) + 1):  # the first run warms up
    llm.reset()
    t0, out = time.perf_counter(), 0
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out += 1
        if out >= n:
            break
    rates.append(n / (time.perf_counter() - t0))
print(json.dumps(rates[1:]))
"""


def time_llama_cpp(python: str, gguf: str, prompt: list[int], n: int, rounds: int) -> list[float]:
    """llama.cpp (llama-cpp-python in its own venv) decoding n greedy tokens from the same prompt ids, batch 1;
    tokens/s per round (prompt processing included, as in ours)."""
    out = subprocess.run([python, "-c", LLAMA_CPP, gguf, json.dumps(prompt), str(n), str(torch.get_num_threads()),
                          str(rounds)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp run failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ppl(model, passages: list[torch.Tensor]) -> float:
    """The mean over the passages of the model's perplexity on each."""
    return statistics.mean(float(cross_entropy(model(ids[:, :-1]), ids[:, 1:]).exp()) for ids in passages)


def streamed_bytes(engine: Engine) -> int:
    """The bytes a decode step reads from the weights of a quantized engine: its blocks (each storage once:
    the layers are views of their joined products) and the layers left in fp32."""
    total, seen = 0, set()
    for m in engine.model.modules():
        if isinstance(m, BlockLinear):
            for b in m.buffers():
                storage = b.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        elif hasattr(m, "weight_int8"):  # torch's int8 weight-only layers (CPUs without AVX2)
            total += m.weight_int8.numel() + m.scales.numel() * m.scales.element_size()
        elif type(m) is torch.nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total


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
    ap.add_argument("--variant", choices=["int8", "int4", "compile", "int8+compile", "int4+compile", "none"],
                    default="int4+compile", help="the second llmgen engine: int8 or int4 weights, a torch.compile'd "
                    "decode step, both, or none")
    ap.add_argument("--llama-cpp-python", default=None, help="python of a venv with llama-cpp-python built from source: "
                    "adds llama.cpp's batch-1 tokens/s on --smollm2-gguf (its own weights, e.g. Q4_1) for smollm2")
    ap.add_argument("--out", default="bench_out/generate.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    v = args.variant
    rows, result = [], {"new_tokens": args.new_tokens, "rounds": args.rounds, "variant": v, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            folder = build(name, work, args.smollm2_gguf)
            lm = load_model(str(folder))
            engine = Engine(lm.model, lm.tokenizer, options=EngineOptions(device="cpu"))
            print(f"{name}: llmgen decodes with {engine.describe()}", flush=True)
            result.setdefault("engine", {})[name] = engine.describe()
            engine2 = None  # the second engine: int8 weights, or the compiled decode step
            if v != "none":
                lm2 = load_model(str(folder))
                quant = v.split("+")[0] if v.startswith("int") else None
                engine2 = Engine(lm2.model, lm2.tokenizer, options=EngineOptions(
                    device="cpu", quantize=quant, compile="compile" in v))
                print(f"{name}: second engine ({v}) decodes with {engine2.describe()}", flush=True)
            text = (SHARED / "wizard_of_oz.txt").read_text()[:40000] if (SHARED / "wizard_of_oz.txt").is_file() else "the cat sat " * 3000
            ids = torch.tensor([lm.tokenizer.encode(text)])
            passages = [ids[:, a:a + n + 1] for a, n in ((0, 256), (256, 1024), (2000, 1024), (4000, 1024))
                        if a + n < ids.shape[1] and n < lm.model.cfg.max_seq_len]
            ppl32 = ppl(load_model(str(folder)).model, passages)  # the fp32 weights as loaded
            ppl2 = ppl(engine2.model, passages) if engine2 else float("nan")
            hf = AutoModelForCausalLM.from_pretrained(export_hf(str(folder), work / "hf"), dtype=torch.float32).eval()
            prompt = list(range(3, 19))  # 16 prompt tokens
            n_params = engine.n_params
            # bytes streamed per token: the projections in the precision they run in (fp16 weights: 2 bytes)
            weight_bytes = n_params * (2 if "fp16 weights" in engine.weights else engine.dtype.itemsize)
            rate = read_rate(weight_bytes)
            bytes2 = streamed_bytes(engine2) if engine2 and engine2.weights.startswith("int") else weight_bytes
            for batch in sorted({1, args.batch}):
                prompts = [prompt] * batch
                ours, ours2, theirs = [], [], []
                time_ours(engine, prompts, 8), engine2 and time_ours(engine2, prompts, 8), time_hf(hf, prompts, 8)  # warm-up
                for _ in range(args.rounds):
                    ours.append(time_ours(engine, prompts, args.new_tokens))
                    ours2.append(time_ours(engine2, prompts, args.new_tokens) if engine2 else float("nan"))
                    theirs.append(time_hf(hf, prompts, args.new_tokens))
                o, o2, t = statistics.median(ours), statistics.median(ours2), statistics.median(theirs)
                limit = rate / weight_bytes * batch
                limit2 = rate / bytes2 * batch
                result["models"][f"{name}/b{batch}"] = {
                    "params_M": n_params / 1e6, "ours_tok_s": o, f"ours_{v}_tok_s": o2, "hf_tok_s": t, "ratio": o / t,
                    f"ratio_{v}": o2 / t, "weight_read_GBps": rate / 1e9, "bandwidth_limit_tok_s": limit,
                    "ppl_fp32": ppl32, f"ppl_{v}": ppl2, "ours_rounds": ours, f"ours_{v}_rounds": ours2, "hf_rounds": theirs}
                row = [name, f"{n_params / 1e6:.1f}M", batch, f"{o:.1f}", f"{t:.1f}", f"{o / t:.2f}x", f"{o / limit:.0%}"]
                line = f"{name} batch {batch}: ours {o:.1f} tok/s, transformers {t:.1f} ({o / t:.2f}x, {o / limit:.0%} of the limit)"
                lc = "-"
                if args.llama_cpp_python and name == "smollm2" and args.smollm2_gguf and batch == 1:
                    lcpp = statistics.median(time_llama_cpp(args.llama_cpp_python, args.smollm2_gguf, prompt,
                                                            args.new_tokens, args.rounds))
                    result["models"][f"{name}/b{batch}"]["llama_cpp_tok_s"] = lcpp
                    lc = f"{lcpp:.1f} ({o / lcpp:.2f}x)"
                    line += f"; llama.cpp {lcpp:.1f} tok/s on {Path(args.smollm2_gguf).name} (ours {o / lcpp:.2f}x)"
                row.append(lc)
                if engine2:
                    vs = f" ({o2 / lcpp:.2f}x)" if lc != "-" else ""
                    row += [f"{o2:.1f}{vs}", f"{o2 / t:.2f}x", f"{o2 / limit2:.0%}", f"{(ppl2 - ppl32) / ppl32:+.2%}"]
                    result["models"][f"{name}/b{batch}"].update(ppl_change=(ppl2 - ppl32) / ppl32,
                                                                 variant_bandwidth_limit_tok_s=limit2)
                    line += f"; {v} {o2:.1f} tok/s ({o2 / t:.2f}x), ppl {ppl32:.3f} -> {ppl2:.3f}"
                rows.append(row + [f"{rate / 1e9:.0f}"])
                print(line, flush=True)
    header = ["model", "params", "batch", "llmgen tok/s", "transformers tok/s", "ratio", "% of limit",
              "llama.cpp tok/s (ours / it)"]
    if v != "none":
        header += [f"llmgen {v} tok/s" + (" (ours / llama.cpp)" if args.llama_cpp_python else ""), f"ratio {v}",
                   f"{v} % of limit", f"{v} ppl change"]
    report(args.out, result, header + ["weight read GB/s"], rows)


if __name__ == "__main__":
    main()

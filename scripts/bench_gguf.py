#!/usr/bin/env python
"""Benchmark `llmgen export --format gguf` against llama.cpp's own converter, side by side.

For each model and outtype, ours writes the .gguf straight from the checkpoint; the anchor is the
route the README used to send users down: `llmgen export --format hf`, then llama.cpp's
`convert_hf_to_gguf.py` on that folder (from the llama.cpp sources, e.g. the ones vendored in the
llama-cpp-python sdist: docs/benchmarks.md). Reported: wall time of each route, file size, whether
it worked (the first line of the error when not), and for every file ours wrote the perplexity on a
text after reading it back (`llmgen import`, transformers' GGUF reader) relative to the checkpoint.
With --llama-cpp-python, llama.cpp itself also decodes 64 greedy tokens from our file and from the
converter's: same tokens?, tokens/s.

Models: SmolLM2-135M-Instruct imported from its GGUF (--smollm2), and a `tiny` llmgen model with a
BPE tokenizer trained by llmgen (random weights: what is measured is the conversion, and whether
llama.cpp's converter accepts our tokenizer at all).

    python scripts/bench_gguf.py --convert /tmp/lcsrc/.../vendor/llama.cpp/convert_hf_to_gguf.py \
        --smollm2 ~/.cache/llmgen/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --text ../shared/data/wizard_of_oz.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import report
from llmgen.config import build_config
from llmgen.data.tokenizer import train_bpe
from llmgen.evaluate.perplexity import perplexity
from llmgen.interop.export import export_hf
from llmgen.interop.gguf_export import export_gguf
from llmgen.interop.hf import import_model
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer

GREEDY = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, seed=0, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=False, special=True)
out, t0 = [], time.perf_counter()
for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
    out.append(tok)
    if len(out) >= 64:
        break
print(json.dumps({"ids": out, "tok_s": len(out) / (time.perf_counter() - t0)}))
"""


def tiny_bpe_model(work: Path, text: str) -> Path:
    tok = train_bpe([text], 2048)
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": tok.vocab_size, "max_seq_len": 256}}).model
    torch.manual_seed(0)
    tok.save(work / "tok")
    folder = work / "tiny-bpe"
    save_checkpoint(folder, Transformer(cfg), work / "tok", {"step": 0})
    return folder


def ppl(folder: Path, text: str) -> float:
    lm = load_model(str(folder))
    ids = lm.tokenizer.encode(text)
    return perplexity(lm.model.eval(), ids, max_len=256, stride=256).ppl


def anchor(convert: Path, folder: Path, out: Path, outtype: str) -> tuple[float, str]:
    """(seconds, '' or the error) for export --format hf + convert_hf_to_gguf.py."""
    t0 = time.perf_counter()
    hf = out.with_suffix(".hf")
    export_hf(str(folder), hf, overwrite=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("CONVERT_PYTHONPATH"),
                                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(convert), str(hf), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    err = ""
    if r.returncode != 0:
        lines = [x for x in r.stderr.splitlines() if "Error" in x or "error" in x] or r.stderr.splitlines()[-1:]
        err = lines[-1][:160] if lines else f"exit {r.returncode}"
    return time.perf_counter() - t0, err


def llama_cpp(lcpp: str, gguf: Path, prompt: str) -> dict:
    r = subprocess.run([lcpp, "-c", GREEDY, str(gguf), prompt], capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-200:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct .gguf (scripts/fetch_smollm2.sh)")
    ap.add_argument("--text", default="../shared/data/wizard_of_oz.txt")
    ap.add_argument("--max-chars", type=int, default=20000)
    ap.add_argument("--outtypes", default="f32,f16,q8_0")
    ap.add_argument("--llama-cpp-python", default=None, help="python of a venv with llama-cpp-python built")
    ap.add_argument("--out", default="bench_out/gguf.json")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")[: args.max_chars]
    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    models = {"tiny (llmgen BPE)": tiny_bpe_model(work, text)}
    if args.smollm2:
        models["SmolLM2-135M-Instruct"] = import_model(args.smollm2, work / "smollm2")
    rows = []
    for name, folder in models.items():
        base = ppl(folder, text)
        for outtype in args.outtypes.split(","):
            ours_path = work / f"{folder.name}-{outtype}.gguf"
            t0 = time.perf_counter()
            export_gguf(str(folder), ours_path, outtype, overwrite=True)
            ours_s = time.perf_counter() - t0
            theirs_path = work / f"{folder.name}-{outtype}-convert.gguf"
            theirs_s, err = anchor(Path(args.convert), folder, theirs_path, outtype)
            back = import_model(str(ours_path), work / f"back-{folder.name}-{outtype}")
            row = dict(model=name, outtype=outtype, ours_s=round(ours_s, 2), ours_mb=round(ours_path.stat().st_size / 2 ** 20, 1),
                       convert_s=round(theirs_s, 2), convert=err or "ok",
                       convert_mb=round(theirs_path.stat().st_size / 2 ** 20, 1) if not err else None,
                       ppl_ratio=round(ppl(back, text) / base, 5))
            if args.llama_cpp_python:
                prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" \
                    if "SmolLM2" in name else "Dorothy lived in the midst of"
                a = llama_cpp(args.llama_cpp_python, ours_path, prompt)
                row["llama_cpp_tok_s_ours"] = round(a.get("tok_s", math.nan), 1)
                if not err:
                    b = llama_cpp(args.llama_cpp_python, theirs_path, prompt)
                    row["llama_cpp_tok_s_convert"] = round(b.get("tok_s", math.nan), 1)
                    row["same_greedy_tokens"] = a.get("ids") == b.get("ids")
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(args.out, dict(text=args.text, chars=len(text), rows=rows),
           ["model", "outtype", "llmgen export s", "MB", "export hf + convert_hf_to_gguf.py s", "their result",
            "ppl after round trip / checkpoint", "llama.cpp tok/s (ours / theirs)", "same greedy tokens"],
           [[r["model"], r["outtype"], r["ours_s"], r["ours_mb"], r["convert_s"], r["convert"], r["ppl_ratio"],
             f"{r.get('llama_cpp_tok_s_ours', '-')} / {r.get('llama_cpp_tok_s_convert', '-')}",
             r.get("same_greedy_tokens", "-")] for r in rows])


if __name__ == "__main__":
    main()

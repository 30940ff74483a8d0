#!/usr/bin/env python
"""Benchmark `llmgen eval`'s perplexity against the transformers-docs sliding-window recipe.

A model (a trained llmgen checkpoint given with --model, else a random `small`-preset model with
a bytes tokenizer) is exported to transformers; both sides score the same text with the same
window and stride, alternating rounds. The recipe is the loop from the transformers docs
("Perplexity of fixed-length models"): one window at a time, labels masked to the new tokens.
The two perplexities must agree (relative 1e-4). One correction to the docs' loop: it weights each
window by "valid labels - batch_size", which undercounts by one token per window after the first
(their first label is already masked); we weight by the labels the loss really averaged.

    python scripts/bench_eval.py --text ../shared/data/wizard_of_oz.txt --max-chars 60000 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import report
from llmgen.config import build_config
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.evaluate.perplexity import perplexity
from llmgen.interop.export import export_hf
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer


def hf_recipe(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The docs' loop; returns (mean nll over scored tokens, scored tokens)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # the loss averages over the labels left after transformers' internal shift; the docs subtract
        # batch_size instead, which miscounts by one per window once the first label is masked
        num_valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wizard_of_oz.txt"))
    ap.add_argument("--max-chars", type=int, default=60000)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench_out/eval.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    text = Path(args.text).read_text(encoding="utf-8")[:args.max_chars]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            bytes_tokenizer().save(Path(tmp) / "tok")
            torch.manual_seed(0)
            model = Transformer(build_config({"model": {"preset": "small", "vocab_size": 260}}).model)
            folder = str(Path(tmp) / "ckpt")
            save_checkpoint(Path(folder), model, Path(tmp) / "tok", {"step": 0})
        lm = load_model(folder)
        ours_model = lm.model.eval()
        hf = AutoModelForCausalLM.from_pretrained(export_hf(folder, Path(tmp) / "hf"), dtype=torch.float32).eval()
        ids = torch.tensor([lm.tokenizer.encode(text)])
        window = ours_model.cfg.max_seq_len
        stride = args.stride or window // 2
        ours_t, hf_t = [], []
        for _ in range(args.rounds):
            res = perplexity(ours_model, ids[0].numpy(), len(text.encode()), stride, window, args.batch_size)
            ours_t.append(res.tokens / res.seconds)
            t0 = time.perf_counter()
            ref_loss, ref_n = hf_recipe(hf, ids, window, stride)
            hf_t.append(ref_n / (time.perf_counter() - t0))
        rel = abs(math.exp(res.loss) - math.exp(ref_loss)) / math.exp(ref_loss)
        o, t = statistics.median(ours_t), statistics.median(hf_t)
        print(f"ppl ours {math.exp(res.loss):.6f} vs recipe {math.exp(ref_loss):.6f} (rel diff {rel:.1e}); "
              f"{res.tokens} vs {ref_n} tokens; {o:.0f} vs {t:.0f} tokens/s ({o / t:.2f}x)")
        assert res.tokens == ref_n and rel < 1e-4, "perplexities disagree"
        report(args.out, {"tokens": res.tokens, "window": window, "stride": stride, "ours_ppl": math.exp(res.loss),
                          "hf_ppl": math.exp(ref_loss), "rel_diff": rel, "ours_tok_s": ours_t, "hf_tok_s": hf_t},
               ["model", "tokens", "window/stride", "ppl llmgen", "ppl HF recipe", "rel diff", "llmgen tok/s",
                "HF recipe tok/s", "ratio"],
               [[Path(folder).name, res.tokens, f"{window}/{stride}", f"{math.exp(res.loss):.4f}",
                 f"{math.exp(ref_loss):.4f}", f"{rel:.1e}", f"{o:.0f}", f"{t:.0f}", f"{o / t:.2f}x"]])


if __name__ == "__main__":
    main()

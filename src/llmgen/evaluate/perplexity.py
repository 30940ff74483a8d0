"""Token-weighted perplexity with a sliding window, plus bits per byte.

Windows of `max_len` tokens start every `stride` tokens; each window scores only the tokens the
previous windows have not scored, with all of the window before them as context (the recipe in
the transformers docs, "Perplexity of fixed-length models"). Every token after the first is
scored exactly once, so the result is a true token-weighted average.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class PerplexityResult:
    loss: float  # nats per token
    ppl: float
    tokens: int  # scored tokens
    bits_per_byte: Optional[float]
    seconds: float = 0.0



def token_nll(model, x: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 1 << 26, **kw) -> torch.Tensor:
    """The summed next-token negative log-likelihood (fp32 scalar, nats) of `targets` (B, T) under `model`'s
    logits for `x` (B, T); -100 targets are not scored. The (B, T, V) logits are never in memory at once: the
    final hidden states go through the head ~64 MB of logits at a time, and only at the rows with a target
    (a window of 8 x 8,192 tokens at SmolLM2's 49,152-token vocabulary is 12.9 GB of logits, twice that with
    their log-softmax). Any head module works (a quantized or LoRA-wrapped one too); under autocast the
    logits are taken in fp32 as F.cross_entropy(logits.float()) would."""
    h = model(x, hidden=True, **kw)
    h, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    keep = (t != -100).nonzero().squeeze(1)
    h, t = h.index_select(0, keep), t.index_select(0, keep)
    rows = max(1, chunk_bytes // (4 * model.cfg.vocab_size))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, t.numel(), rows):
        logits = model.lm_head(h[s:s + rows]).float()  # (rows, V)
        total += (torch.logsumexp(logits, -1) - logits.gather(1, t[s:s + rows, None]).squeeze(1)).sum()
    return total


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) per window over n tokens."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_len, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def activation_bytes(cfg) -> int:
    """Bytes of fp32 activations a token holds at once in a forward without gradients (the MLP's gate, up and
    their product beside a few model-width tensors): what sizes a batch of long windows."""
    return 4 * (3 * cfg.ffn_hidden + 6 * cfg.d_model)


@torch.inference_mode()
def perplexity(model, ids: np.ndarray, n_bytes: Optional[int] = None, stride: Optional[int] = None,
               max_len: Optional[int] = None, batch_size: int = 8, device=None, progress=None,
               max_bytes: int = 1 << 30) -> PerplexityResult:
    """Up to `batch_size` windows a forward, fewer where long windows would pass `max_bytes` of activations
    (SmolLM2's 8,192-token windows: 4 a forward)."""
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    stride = min(stride or max_len // 2, max_len)
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    wins = windows(len(ids), max_len, stride)
    nll, count = 0.0, 0
    # full-length windows share a batch; the (shorter) last one runs alone
    groups: dict[int, list] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    for length, ws in groups.items():
        per = max(1, min(batch_size, max_bytes // (length * activation_bytes(model.cfg))))
        for i in range(0, len(ws), per):
            chunk = ws[i:i + per]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            targets = torch.full_like(x, -100)
            for r, (b, e, first) in enumerate(chunk):
                # logits at local position k predict token b + k + 1; score tokens first..e-1
                k0 = first - b - 1
                targets[r, k0:e - b - 1] = x[r, k0 + 1:]
            nll += float(token_nll(model, x, targets))
            count += int((targets != -100).sum())
            if progress is not None:
                progress(len(chunk))
    mean = nll / max(count, 1)
    bpb = nll / math.log(2) / n_bytes if n_bytes else None
    return PerplexityResult(mean, math.exp(min(mean, 700)), count, bpb, time.perf_counter() - t0)

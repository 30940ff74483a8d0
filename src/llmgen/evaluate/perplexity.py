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
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    loss: float  # nats per token
    ppl: float
    tokens: int  # scored tokens
    bits_per_byte: Optional[float]
    seconds: float = 0.0



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


@torch.inference_mode()
def perplexity(model, ids: np.ndarray, n_bytes: Optional[int] = None, stride: Optional[int] = None,
               max_len: Optional[int] = None, batch_size: int = 8, device=None, progress=None) -> PerplexityResult:
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
        for i in range(0, len(ws), batch_size):
            chunk = ws[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            targets = torch.full_like(x, -100)
            for r, (b, e, first) in enumerate(chunk):
                # logits at local position k predict token b + k + 1; score tokens first..e-1
                k0 = first - b - 1
                targets[r, k0:e - b - 1] = x[r, k0 + 1:]
            logits = model(x)  # (B, T, V)
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
            if progress is not None:
                progress(len(chunk))
    mean = nll / max(count, 1)
    bpb = nll / math.log(2) / n_bytes if n_bytes else None
    return PerplexityResult(mean, math.exp(min(mean, 700)), count, bpb, time.perf_counter() - t0)

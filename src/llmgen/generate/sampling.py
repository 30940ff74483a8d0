"""Logits processors: small pure functions over next-token logits (B, V), one per strategy.

Each takes logits and returns new logits (banned tokens at -inf); `pick` turns the result into
token ids. They compose in the order transformers uses: penalties, then temperature, then the
truncation filters (top-k, top-p, min-p), then sampling.
"""

from __future__ import annotations

from typing import Optional

import torch

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for tokens already in the sequence (seen (B, V) bool), divide a
    positive logit by `penalty` and multiply a negative one by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI-style: subtract `presence` once for every token that occurred and `frequency` per occurrence."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def no_repeat_ngram(logits: torch.Tensor, sequences: list[list[int]], n: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already present in that row's sequence."""
    if n <= 0:
        return logits
    out = logits.clone()
    for row, seq in enumerate(sequences):
        if len(seq) < n:
            continue
        prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
        if banned:
            out[row, banned] = NEG_INF
    return out


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits if t == 1.0 or t == 0.0 else logits / t


def top_k(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k highest logits of each row (ties at the k-th value are kept)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= p  # already reached p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(-1, keepdim=True).values, NEG_INF)


def pick(logits: torch.Tensor, greedy: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,): argmax, or a sample from softmax(logits)."""
    if greedy:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

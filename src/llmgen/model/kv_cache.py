"""The KV cache: keys and values of the tokens seen so far, preallocated and written in place.

Three ways to write, chosen by the type of `pos`:
- sliced (`pos` an int): the new keys go to slots pos..pos+T-1 and attention sees slots 0..pos+T-1.
  Shapes grow every step: what eager decoding uses.
- static (`pos` a (T,) tensor of slots): the new keys go to those slots and attention sees the whole
  cache; the caller's mask hides the slots not written yet. Shapes never change, so one compiled
  decode step serves every position.
- per row (`pos` a (B, T) tensor): row b's new keys go to slots pos[b], and attention sees slots
  0..seen-1 (`seen` set by the caller, whose mask hides each row's unwritten slots): continuous
  batching, where every row is at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from llmgen.config import ModelConfig


@dataclass
class KVCache:
    """One (B, nkv, max_len, hs) tensor per layer for keys and one for values. Separate tensors, not one
    (n_layer, ...) block: the compiled decode step then updates each layer's cache in place (a write
    into a slice of one shared input makes inductor copy the whole block per layer)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seen: int = 0  # per-row writes: how many slots attention sees

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch, cfg.n_kv, max_len, cfg.head_size)
        return cls(*([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)] for _ in "kv"))

    def update(self, layer: int, pos: Union[int, torch.Tensor], k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new keys/values k, v (B, nkv, T, hs) at `pos`; return all the keys and
        values attention should see, (B, nkv, S, hs)."""
        ck, cv = self.k[layer], self.v[layer]
        if isinstance(pos, torch.Tensor) and pos.dim() == 2:  # per row
            B = k.shape[0]
            rows = torch.arange(B, device=k.device)[:, None]
            ck[rows, :, pos] = k.transpose(1, 2)  # (B, T, nkv, hs) into each row's own slots
            cv[rows, :, pos] = v.transpose(1, 2)
            return ck[:B, :, :self.seen], cv[:B, :, :self.seen]
        if isinstance(pos, torch.Tensor):  # static: slots given, the whole cache is seen
            ck.index_copy_(2, pos, k)
            cv.index_copy_(2, pos, v)
            return ck, cv
        B, T = k.shape[0], k.shape[2]
        ck[:B, :, pos:pos + T] = k
        cv[:B, :, pos:pos + T] = v
        return ck[:B, :, :pos + T], cv[:B, :, :pos + T]

    def reorder(self, src: torch.Tensor, length: int) -> None:
        """Row b of every layer's first `length` slots becomes row src[b] (beam search), in place."""
        for t in (*self.k, *self.v):
            t[:, :, :length] = t[src, :, :length]

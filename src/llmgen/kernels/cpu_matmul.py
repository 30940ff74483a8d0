"""Decoding matmuls on every CPU core.

Decoding multiplies one row (or a few) by each weight matrix, so a step is bound by how fast the
weights stream from memory. Some BLAS builds run such a product on one core (MKL on AMD CPUs: no
faster with 2 threads); there `linear` splits it itself: each thread multiplies its own contiguous
block of the weight's rows (a slice of the input features), and the partial products are summed.
Whether that pays is measured once per process (`split_pays`); only then are weights stored
column-major (`decode_layout`), which is what makes `linear` split.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def split_pays() -> bool:
    """Whether this CPU's BLAS runs a one-row matrix product on one core (measured once per process).
    Some builds thread it (MKL on recent Intel CPUs: 2 threads ~1.9x faster than 1), some do not (the
    same MKL on AMD); there the split reads the weights 2.6-3x faster on 2 cores."""
    threads = torch.get_num_threads()
    if threads < 2:
        return False
    w, x = torch.ones(2048, 1024), torch.ones(1, 1024)  # 8 MB: past the private caches; no RNG draws
    best = {1: float("inf"), threads: float("inf")}
    try:
        with torch.no_grad():
            for _ in range(15):  # alternate, so a noisy neighbour slows both counts alike; keep the best
                for n in best:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    F.linear(x, w)
                    best[n] = min(best[n], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[threads] > 0.7 * best[1]  # the other threads did not help


def decode_layout(w: torch.Tensor) -> torch.Tensor:
    """The same (out, in) weight stored column-major (a view of a contiguous (in, out) tensor) on a CPU
    where the split product pays; elsewhere unchanged."""
    return w.t().contiguous().t() if w.device.type == "cpu" and split_pays() else w


def split_product(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """x @ w.T for a column-major w, as `parts` blocks of input features (one per thread) in one bmm,
    partial products summed."""
    out, inn = w.shape
    k = inn // parts
    xs = x.reshape(-1, parts, k).transpose(0, 1)  # (parts, rows, in/parts)
    return torch.bmm(xs, w.t().view(parts, k, out)).sum(0).view(*x.shape[:-1], out)


_split_op = None
_compiled_threads = 1  # the thread count compiled decode steps split for (torch.get_num_threads breaks graphs)


def register_split_op() -> None:
    """Register the split product as an opaque operator for torch.compile (once, when a model is
    prepared for decoding; not at import): inductor would otherwise lower the bmm and the sum into its
    own loops (slower than eager on `small`, measured) instead of calling BLAS. Also records the thread
    count for compiled steps, which cannot ask for it without breaking the graph."""
    global _split_op, _compiled_threads
    _compiled_threads = torch.get_num_threads()
    if _split_op is None:
        op = torch.library.custom_op("llmgen::split_linear", split_product, mutates_args=(),
                                     schema="(Tensor x, Tensor w, int parts) -> Tensor")
        op.register_fake(lambda x, w, parts: x.new_empty(*x.shape[:-1], w.shape[0]))
        _split_op = op


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, w, b); decoding on the CPU (a few rows, no gradients) with a column-major weight
    from `decode_layout`, split over the threads. Equal to F.linear up to float rounding (the sum
    runs in a different order)."""
    out, inn = w.shape
    if w.stride(0) == 1 and out * inn >= 1 << 18 and x.device.type == "cpu" and x.numel() <= 64 * inn \
            and not torch.is_grad_enabled():  # from 1 MB of fp32 weights; smaller ones stay in cache
        parts = _compiled_threads if torch.compiler.is_compiling() else torch.get_num_threads()
        while inn % parts:  # as many equal blocks as threads, or the nearest count below that divides
            parts -= 1
        if parts > 1:
            compiled = torch.compiler.is_compiling() and _split_op is not None
            y = (_split_op if compiled else split_product)(x, w, parts)
            return y if b is None else y + b
    return F.linear(x, w, b)


class DecodeLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    @classmethod
    def wrap(cls, layer: nn.Linear) -> "DecodeLinear":
        """A DecodeLinear sharing `layer`'s parameters (tied weights stay tied), weight in decode layout."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        new.weight.data = decode_layout(layer.weight.data)
        new.made_from = new.weight.data_ptr()  # kernels.stale
        return new

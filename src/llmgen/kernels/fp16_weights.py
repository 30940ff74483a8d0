"""fp16 weights for CPU decoding: FBGEMM's fp16 matrix product (torch's x86 quantized engine).

Decoding streams every weight once per step, so on a CPU its speed is the bytes it reads. Here each
projection's weight is packed once into FBGEMM's fp16 layout (half fp32's bytes); activations,
accumulation and outputs stay fp32 (the weights are widened in registers), so the result is the
fp32 product with the weights rounded to fp16: SmolLM2's perplexity changes by about 0.02 %. On the
AMD EPYC machine kind it runs a decode matmul 1.6-3x faster than the fp32 split product, and it is
never much slower up to a few hundred rows (prefill). Whether it pays is measured once per process
(`decode_seconds`); `prepare_for_inference` uses it by default only where it does.

The packed weights are opaque objects that torch.compile cannot trace, so they sit in a table and
the product is a custom operator that takes the table index.
"""

from __future__ import annotations

import copy
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmgen.kernels.cpu_matmul import decode_layout, linear

_packed: list = []  # FBGEMM packed weights (or the Future of one being packed), by handle
_lib: Optional[torch.library.Library] = None  # defines llmgen::fp16_linear on first use
_pool: Optional[ThreadPoolExecutor] = None  # packs on every core


def available() -> bool:
    """Whether this torch build has FBGEMM's fp16 product (x86 CPU builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                               "linear_prepack_fp16")


def _free(handle: int) -> None:
    _packed[handle] = None


def _product(x: torch.Tensor, handle: int, out: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    packed = _packed[handle]
    if isinstance(packed, Future):
        packed = _packed[handle] = packed.result()
    return torch.ops.quantized.linear_dynamic_fp16(x2.contiguous(), packed).view(*x.shape[:-1], out)


def pack(w: torch.Tensor, b: Optional[torch.Tensor], owner: object) -> int:
    """Pack a fp32 (out, in) weight (and bias) in FBGEMM's fp16 layout, kept while `owner` lives; its
    handle for `fp16_linear`."""
    global _lib, _pool
    if _lib is None:  # the operator is defined on first use, not at import; a plain dispatcher
        _lib = torch.library.Library("llmgen", "FRAGMENT")  # kernel: ~7 us a call (custom_op: ~30)
        _lib.define("fp16_linear(Tensor x, int handle, int out) -> Tensor")
        _lib.impl("fp16_linear", _product, "CPU")
        _lib.impl("fp16_linear", lambda x, handle, out: x.new_empty(*x.shape[:-1], out), "Meta")
    if _pool is None:  # packing converts every weight once (~1 s for 135M parameters on one core); the op
        # lets go of the GIL, so the cores pack in parallel
        _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="llmgen-pack")
    _packed.append(_pool.submit(torch.ops.quantized.linear_prepack_fp16, w.detach().float().contiguous(),
                                None if b is None else b.detach().float()))
    weakref.finalize(owner, _free, len(_packed) - 1)
    return len(_packed) - 1


def ready() -> None:
    """Wait for the packs under way (a packing error surfaces here)."""
    for i, p in enumerate(_packed):
        if isinstance(p, Future):
            _packed[i] = p.result()


MAX_ROWS = 1024  # above this many rows FBGEMM's fp16 product is no faster than fp32 (0.86-1.09x, measured)


def decoding(x: torch.Tensor) -> bool:
    """Whether x (..., in) is a decoding-sized input (decode steps, prefill chunks of up to 512 tokens) for
    the fp16 pack; larger ones (perplexity batches) use the fp32 weights the layer keeps, so evaluation
    scores the model's own weights and generation never mixes the two paths."""
    return x.numel() <= MAX_ROWS * x.shape[-1]


def fp16_linear(x: torch.Tensor, handle: int, out: int) -> torch.Tensor:
    """x @ W.T (+ b) for the packed weight `handle` with `out` output features; x fp32 on the CPU."""
    return torch.ops.llmgen.fp16_linear(x, handle, out) if torch.compiler.is_compiling() else _product(x, handle, out)


_timed: dict[str, float] = {}  # decode_seconds' measurements, once per process


def decode_seconds(bf16: bool = False) -> dict[str, float]:
    """Seconds a decode matmul (one and four rows by a 2048 x 1024 weight, 8 MB in fp32: past the private
    caches) takes on this CPU through each weight path: `fp32` (the fp32 decode path), `fp16` (these fp16
    weights; inf where FBGEMM is missing) and, with `bf16` (asked only where bf16 matmuls measured faster, so
    other CPUs pay nothing for it; inf otherwise), bf16 weights and activations through torch's product, what
    `--dtype bf16` decodes with. Best of alternating rounds (~30 ms), measured once per process (again only
    to add bf16); a path clearly slower than fp32 after two rounds is not timed further."""
    if _timed and ("bf16" in _timed or not bf16):
        return {"bf16": float("inf"), **_timed}
    w = torch.ones(2048, 1024) * 0.01  # no RNG draws
    xs = [torch.ones(1, 1024), torch.ones(4, 1024)]
    paths = {"fp32": (lambda x, w32=decode_layout(w): linear(x, w32))}
    if bf16:
        paths["bf16"] = lambda x, wb=w.bfloat16(): F.linear(x.bfloat16(), wb)
    if available():
        handle = pack(w, None, w)  # freed with w
        paths["fp16"] = lambda x: fp16_linear(x, handle, 2048)
    best = {kind: float("inf") for kind in ("fp32", "fp16")} | {kind: float("inf") for kind in paths}
    with torch.no_grad():
        for round_ in range(8):
            for kind, product in paths.items():
                if round_ >= 2 and best[kind] > 2 * best["fp32"]:
                    continue
                t0 = time.perf_counter()
                for x in xs:
                    product(x)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    _timed.clear()
    _timed.update(best)
    return decode_seconds(bf16)


class Fp16Linear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) that multiplies through its fp16-packed copy.
    For inference: the pack is a snapshot of the weights when it was made."""

    handle: int
    made_from: int  # the data_ptr of the weight packed (kernels.stale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not decoding(x):  # a perplexity batch: the model's own weights, as fast there and exact
            return F.linear(x, self.weight, self.bias)
        return fp16_linear(x, self.handle, self.out_features)

    def __deepcopy__(self, memo) -> "Fp16Linear":
        return repacked(self, memo)

    @classmethod
    def wrap(cls, layer: nn.Linear) -> "Fp16Linear":
        """An Fp16Linear sharing `layer`'s parameters (tied weights stay tied), packed now."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        new.handle = pack(layer.weight, layer.bias, new)
        new.made_from = layer.weight.data_ptr()
        return new


def repacked(obj, memo):
    """A deep copy of `obj` (an Fp16Linear or a fused projection) with a pack of its own: a shared handle
    would be freed with the original."""
    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in obj.__dict__.items()})
    if getattr(new, "handle", None) is not None:
        new.handle = pack(new.weight, new.bias, new)
        new.made_from = new.weight.data_ptr() if obj.weight.data_ptr() == obj.made_from else -1  # stale stays stale
    return new

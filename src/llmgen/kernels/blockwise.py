"""4- and 8-bit block-quantized weights for CPU decoding (`--quantize int4 | int8`), with AVX2 kernels.

Decoding one token reads every weight once, so a CPU decodes at the rate its cores get through the
weight bytes. torch has no low-bit product that is fast at one row on an AVX2 CPU (its int8 and int4
weight-only kernels measured 3-10x slower than fp32 on the AMD EPYC machine kind; see
docs/benchmarks.md), so this module carries one: `blockwise.cpp`, built with the C++ compiler on the
first use on a machine (~10 s, cached under ~/.cache/llmgen/kernels: `native.py`) and registered as
torch operators (so compiled decode steps call it too).

The formats are the ones llama.cpp made common: blocks of 32 weights along the input features, each
with an fp16 scale; int4 keeps codes 0..15 and a per-block minimum (0.625 bytes a weight, GGUF's
Q4_1), int8 signed codes (1.06 bytes a weight, Q8_0). int4 products round the activations to int8 per
block of 32 at run time and run on integer multiply-adds (as llama.cpp does; its arithmetic is what
bounds it); int8 products are weight-only, the codes widened to fp32 in registers (bound by memory, as
fast as the integer form and without rounding the activations). `--quantize int4` keeps the output
head in int8 (as llama.cpp's Q4 files keep the embedding in Q8_0): one 49,152-row head in 4 bits costs
a small model far more quality than all its blocks do.

Beside them, two kernels every fp32 CPU decode uses (`kernels.use_decode_kernels`; int4, int8, fp16 or fp32
weights alike): attention for one new token per row, and RMSNorm in one pass a row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from llmgen.errors import LlmgenError
from llmgen.kernels import native
from llmgen.model.transformer import attend

BLOCK = 32
SOURCE = Path(__file__).with_name("blockwise.cpp")


WHAT = "the CPU decoding kernels (int4/int8 products, attention, RMSNorm)"


def missing() -> Optional[str]:
    """Why the kernels cannot run here (None where they can): an x86 CPU with AVX2 and a C++ compiler."""
    return native.missing(WHAT)


def load() -> None:
    """Build (first use on a machine) and load the kernels; LlmgenError with the reason where they cannot."""
    why = missing()
    if why:
        raise LlmgenError(f"--quantize int4/int8 on the CPU: {why}; use --quantize fp16 or none")
    try:
        native.build(SOURCE, WHAT, 10)
    except LlmgenError as e:
        raise LlmgenError(f"{e}; use --quantize fp16 or none") from None


def pack(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """A (out, in) weight as blocks of 32 along `in`: {"q": codes, "d": fp16 scales[, "m": fp16 minimums]}."""
    out, inn = w.shape
    blocks = w.detach().float().reshape(out, inn // BLOCK, BLOCK)
    if bits == 8:
        d = (blocks.abs().amax(-1) / 127).half()
        scale = d.float()[..., None]
        q = torch.where(scale > 0, torch.round(blocks / scale.clamp(min=1e-30)), 0).clamp(-127, 127)
        return {"q": q.to(torch.int8).reshape(out, inn), "d": d}
    low, high = blocks.amin(-1), blocks.amax(-1)
    d, m = ((high - low) / 15).half(), low.half()
    scale = d.float()[..., None]
    q = torch.where(scale > 0, torch.round((blocks - m.float()[..., None]) / scale.clamp(min=1e-30)), 0).clamp(0, 15)
    pairs = q.to(torch.uint8).reshape(out, inn // (2 * BLOCK), 2, BLOCK)
    return {"q": (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(out, inn // 2), "d": d, "m": m}


def unpack(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight a pack stands for (what the kernels multiply by; int4 also rounds the activations)."""
    d = p["d"].float()[..., None]
    if "m" not in p:
        out, inn = p["q"].shape
        return (p["q"].float().reshape(out, -1, BLOCK) * d).reshape(out, inn)
    out, half = p["q"].shape
    pairs = p["q"].reshape(out, -1, BLOCK)
    codes = torch.stack([pairs & 15, pairs >> 4], dim=2)  # (out, pairs, 2, 32)
    return (codes.reshape(out, -1, BLOCK).float() * d + p["m"].float()[..., None]).reshape(out, half * 2)


def fits(layer: nn.Linear) -> bool:
    """Whether a layer can take blockwise weights (input features a multiple of 64)."""
    return layer.in_features % (2 * BLOCK) == 0


class BlockLinear(nn.Module):
    """A Linear whose weight is kept only as 4- or 8-bit blocks (`pack`). Takes fp32 activations on the
    CPU; inference only."""

    def __init__(self, blocks: dict[str, torch.Tensor], bias: Optional[torch.Tensor], bits: int, in_features: int):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, blocks["q"].shape[0]
        for name, t in blocks.items():
            self.register_buffer(name, t)
        self.bias = bias

    @classmethod
    def joined(cls, layers: Sequence[nn.Linear], bits: int) -> tuple["BlockLinear", list["BlockLinear"]]:
        """One BlockLinear for the layers' weights stacked (q/k/v, or gate/up: one product), and one per
        layer whose blocks are row slices of it (each still runs on its own; no second copy)."""
        weight = torch.cat([m.weight.detach() for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias.detach().float() for m in layers])
        whole = cls(pack(weight, bits), bias, bits, layers[0].in_features)
        parts, row = [], 0
        for m in layers:
            rows = slice(row, row + m.out_features)
            parts.append(cls({k: t[rows] for k, t in whole.named_buffers()}, None if bias is None else bias[rows],
                             bits, m.in_features))
            row += m.out_features
        return whole, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            y = torch.ops.llmgen_blockwise.q4_linear(x, self.q, self.d, self.m)
        else:
            y = torch.ops.llmgen_blockwise.q8_linear(x, self.q, self.d)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} blocks of {BLOCK}"


class Split:
    """Callable: x -> the outputs of the stacked layers of `whole` (`BlockLinear.joined`), from one product.
    A plain object (as kernels.fused.FusedLinear), so it adds nothing to the model's state dict."""

    def __init__(self, whole: BlockLinear, parts: Sequence[BlockLinear]):
        self.whole, self.sizes = whole, [p.out_features for p in parts]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whole(x).split(self.sizes, dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """The RMSNorm module's kernel hook in inference (`kernels.use_decode_kernels` sets it): fp32 CPU rows in one pass
    through `llmgen_blockwise::rms_norm` (also inside torch.compile, as an opaque operator: the compiled step
    computes what the eager one does, token for token); None (the module's plain path) for anything else."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or not x.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):  # no backward here
        return None
    return torch.ops.llmgen_blockwise.rms_norm(x, weight, eps)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  p: float) -> torch.Tensor:
    """transformer.attend, with one new token per row (decoding, fp32 on the CPU) through
    `llmgen_blockwise::decode_attention` (torch's CPU attention kernel costs ~35 us a call at that size,
    1 ms of a SmolLM2 step over 30 layers); anything else through transformer.attend."""
    B, nh, T, hs = q.shape
    if T != 1 or p or q.dtype != torch.float32 or q.device.type != "cpu" or hs % 8:
        return attend(q, k, v, mask, p)
    nkv = k.shape[1]
    y = torch.ops.llmgen_blockwise.decode_attention(q.reshape(B, nkv, nh // nkv, hs), k, v, mask)
    return y.reshape(B, nh, 1, hs)

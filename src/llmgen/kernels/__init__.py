"""Speed paths beside the network, applied to a built model from outside (as gpt-fast keeps
`quantize.py` beside `model.py`). `prepare_for_inference` is the one seam: it swaps modules and sets
the model's fused projections; the network itself never tests which kernel it runs.

    fused.py       q/k/v and gate/up as one matmul
    cpu_matmul.py  decoding matmuls split over the CPU cores (where the BLAS leaves cores idle)
    fp16_weights.py  fp16 weights through FBGEMM on x86 CPUs (half the bytes per decode step)
    int8.py        int8 weight-only linear layers (torch's kernel; GPUs and CPUs without AVX2)
    blockwise.py   int8 / int4 weights in blocks of 32 with AVX2 kernels of our own (blockwise.cpp)
    training.py    fused RMSNorm / RoPE / SwiGLU / GELU for CPU training (training.cpp; the trainer's seam:
                   `training.enable(model)`)
    native.py      building and caching the C++ sources for the machine

Each has a test proving it equal to the plain path (tests/test_kernels.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from llmgen.errors import LlmgenError
from llmgen.kernels import blockwise, fp16_weights
from llmgen.kernels.blockwise import BlockLinear, Split
from llmgen.kernels.cpu_matmul import DecodeLinear, register_split_op
from llmgen.kernels.fp16_weights import Fp16Linear
from llmgen.kernels.fused import FusedLinear, plain
from llmgen.kernels.int8 import Int8Linear
from llmgen.model.transformer import RMSNorm, Transformer

FP16_WORTH = 1.3  # fp16 weights are used by default where a decode matmul runs this much faster with them
BF16_DECODE_WORTH = 1.15  # bf16 decodes by default (dtype auto) where it beats the fp32-activation paths by this


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every plain Linear (blocks and output head; the embedding stays) by Int8Linear, in place."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return model


def quantize_blockwise(model: Transformer, bits: int) -> Transformer:
    """Every projection of the blocks in `bits`-bit blocks (q/k/v and gate/up each as one product), the
    output head in int8, in place; the fp32 weights of the layers swapped are let go (the embedding stays:
    a tied head keeps it). Layers wrapped by someone else (an unmerged LoRA adapter) and layers whose input
    features are not a multiple of 64 keep running themselves."""
    blockwise.load()
    swapped = []

    def swap(parent: nn.Module, names: tuple[str, ...], bits: int):
        layers = [getattr(parent, n) for n in names]
        if not (plain(*layers) and all(blockwise.fits(m) for m in layers)):
            return None
        whole, parts = BlockLinear.joined(layers, bits)
        swapped.append(whole)
        for n, part in zip(names, parts):
            setattr(parent, n, part)
        return Split(whole, parts)

    for block in model.blocks:
        a, m = block.attn, block.mlp
        a.fused_qkv = swap(a, ("wq", "wk", "wv"), bits)
        m.fused_gate_up = swap(m, ("w1", "w3"), bits) if m.gated else None
        for parent, name in ((a, "wo"), (m, "w2")) + (() if m.gated else ((m, "w1"),)):
            swap(parent, (name,), bits)
    swap(model, ("lm_head",), 8)
    use_decode_kernels(model)
    if not swapped:
        raise LlmgenError(f"--quantize int{bits}: no projection of this model can take blocks of 32 weights (their "
                          f"input features must be a multiple of 64; d_model is {model.cfg.d_model}); use --quantize "
                          f"fp16 or none")
    return model


def use_decode_kernels(model: Transformer) -> bool:
    """One-token attention and RMSNorm through llmgen_blockwise's kernels (`decode_attend`, `rms_norm`: torch's
    cost 35 and 11-28 us a call at SmolLM2's size, a few of ours), set on the model's hooks, for an fp32 model
    on an AVX2 CPU; the library is built on first use (~10 s). Where it cannot be, torch's ops stay: returns
    whether the kernels are on. (The hooks take the plain path for anything but fp32 CPU inference.)"""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or blockwise.missing():
        return False
    try:
        blockwise.load()
    except LlmgenError:
        return False
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.kernel = blockwise.rms_norm
    for block in model.blocks:
        block.attn.attend = blockwise.decode_attend
    return True


def stale(fused, first: nn.Module) -> bool:
    """Whether a fused projection (or a swapped layer) is missing or no longer backs its layers (the
    model was moved to another device or dtype since: its parameters are new tensors, not the weight
    it was made from)."""
    return getattr(fused, "made_from", None) != first.weight.data_ptr()  # (training's JoinedLinears: not made from one)


def fuse_projections(model: Transformer, fp16: bool = False) -> Transformer:
    """q/k/v and gate/up each as one matmul (views: no extra memory), and every other projection through
    the CPU decode matmul, in place; with `fp16`, every projection multiplies through an fp16-packed
    copy of its weight (`fp16_weights.py`; the fp32 parameters stay, unused). Layers wrapped by someone
    else (an unmerged LoRA adapter) keep running themselves. Call after moving the model to its device
    and dtype; for gradient-free use: packed copies do not follow later changes to the weights."""
    register_split_op()
    cls = Fp16Linear if fp16 else DecodeLinear

    def redo(fused: Optional[FusedLinear], first: nn.Module) -> bool:
        return stale(fused, first) or (fused.handle is not None) != fp16

    def swap(layer: nn.Module) -> nn.Module:  # a plain layer, or ours for another path or stale weights
        if plain(layer) or (type(layer) in (DecodeLinear, Fp16Linear) and (type(layer) is not cls or stale(layer, layer))):
            return cls.wrap(layer)
        return layer

    for block in model.blocks:
        a, m = block.attn, block.mlp
        if redo(a.fused_qkv, a.wq) and plain(a.wq, a.wk, a.wv):
            a.fused_qkv = FusedLinear((a.wq, a.wk, a.wv), fp16)
        if m.gated and redo(m.fused_gate_up, m.w1) and plain(m.w1, m.w3):
            m.fused_gate_up = FusedLinear((m.w1, m.w3), fp16)
        for parent, name in ((a, "wo"), (m, "w2")) + (() if m.gated else ((m, "w1"),)):
            setattr(parent, name, swap(getattr(parent, name)))
    model.lm_head = swap(model.lm_head)
    if fp16:
        fp16_weights.ready()
    return model


def use_fp16_weights(model: Transformer, quantize: Optional[str]) -> tuple[bool, str]:
    """(whether to decode with fp16 weights, why) for `quantize` = auto (None) | none | fp16: by default
    only for an fp32 model on a CPU where FBGEMM's fp16 product is measured clearly faster."""
    p = next(model.parameters())
    fits = p.device.type == "cpu" and p.dtype == torch.float32 and fp16_weights.available()
    if quantize == "fp16":
        if not fits:
            fix = "add --dtype fp32" if p.device.type == "cpu" else "use --dtype fp16 on a GPU"
            raise LlmgenError(f"--quantize fp16 is a CPU path for fp32 models (FBGEMM's fp16 product); this model is "
                              f"{str(p.dtype).replace('torch.', '')} on {p.device.type}: {fix}, or drop --quantize fp16")
        return True, "fp16 weights (FBGEMM), as asked"
    if quantize == "none" or not fits:
        return False, ""
    t = fp16_weights.decode_seconds()
    x = t["fp32"] / t["fp16"]
    why = f"decode matmul {x:.1f}x fp32's on this CPU"
    return (True, f"fp16 weights (FBGEMM: {why})") if x >= FP16_WORTH else (False, f"fp32 weights (fp16: {why})")


def bf16_decodes_faster(quantize: Optional[str]) -> tuple[bool, str]:
    """(whether bf16 weights and activations decode clearly faster than the fp32 paths, why), on a CPU whose
    bf16 matmuls measured faster than fp32's: a decode step is bound by reading the weights, and bf16's
    one-row product can be slower than fp32's even there (an AMD EPYC Zen 4: 0.6-0.8x fp16 weights')."""
    t = fp16_weights.decode_seconds(bf16=True)
    rival = "fp16" if quantize in (None, "auto") and t["fp16"] < t["fp32"] else "fp32"
    x = t[rival] / t["bf16"]
    return x >= BF16_DECODE_WORTH, f"bf16 decode matmul {x:.2f}x {rival} weights'"


def prepare_for_inference(model: Transformer, quantize: Optional[str] = None) -> str:
    """The decoding speed paths for `model`, in place: int8 weights when asked, else fused projections
    with fp32 or fp16 weights (`use_fp16_weights`). Returns the weights' part of the engine's one-line
    summary ("" when there is nothing to say)."""
    if quantize in ("int4", "int8"):
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            if quantize == "int4":
                raise LlmgenError(f"--quantize int4 is a CPU path for fp32 models; this model is "
                                  f"{str(p.dtype).replace('torch.', '')} on {p.device.type}: add --dtype fp32 "
                                  f"--device cpu, or use --quantize int8")
        elif quantize == "int4" or blockwise.missing() is None:
            quantize_blockwise(model, 4 if quantize == "int4" else 8)
            return f"{quantize} weights (blocks of 32{', int8 head' if quantize == 'int4' else ''})"
        quantize_int8(model)
        return "int8 weights (torch's weight-only kernel)"
    fp16, why = use_fp16_weights(model, quantize)
    fuse_projections(model, fp16)
    if use_decode_kernels(model):
        why = ", ".join(filter(None, [why, "attention/RMSNorm kernels"]))
    return why

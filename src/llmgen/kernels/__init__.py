"""Speed paths beside the network, applied to a built model from outside (as gpt-fast keeps
`quantize.py` beside `model.py`). `prepare_for_inference` is the one seam: it swaps modules and sets
the model's fused projections; the network itself never tests which kernel it runs.

    fused.py       q/k/v and gate/up as one matmul
    cpu_matmul.py  decoding matmuls split over the CPU cores (where the BLAS leaves cores idle)
    int8.py        int8 weight-only linear layers

Each has a test proving it equal to the plain path (tests/test_kernels.py).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from llmgen.kernels.cpu_matmul import DecodeLinear, register_split_op
from llmgen.kernels.fused import FusedLinear, plain
from llmgen.kernels.int8 import Int8Linear
from llmgen.model.transformer import Transformer


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every plain Linear (blocks and output head; the embedding stays) by Int8Linear, in place."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return model


def stale(fused, first: nn.Module) -> bool:
    """Whether a fused projection is missing or no longer backs its layers (the model was moved to
    another device or dtype since: its parameters are new tensors, not views of the joined weight)."""
    return fused is None or first.weight.data_ptr() != fused.weight.data_ptr()


def fuse_projections(model: Transformer) -> Transformer:
    """q/k/v and gate/up each as one matmul (views: no extra memory), and every other projection through
    the CPU decode matmul, in place. Layers wrapped by someone else (an unmerged LoRA adapter) keep
    running themselves. Call after moving the model to its device and dtype; for gradient-free use."""
    register_split_op()
    for block in model.blocks:
        a, m = block.attn, block.mlp
        if stale(a.fused_qkv, a.wq) and plain(a.wq, a.wk, a.wv):
            a.fused_qkv = FusedLinear((a.wq, a.wk, a.wv))
        if m.gated and stale(m.fused_gate_up, m.w1) and plain(m.w1, m.w3):
            m.fused_gate_up = FusedLinear((m.w1, m.w3))
        for parent, name in ((a, "wo"), (m, "w2")) + (() if m.gated else ((m, "w1"),)):
            if plain(getattr(parent, name)):
                setattr(parent, name, DecodeLinear.wrap(getattr(parent, name)))
    if plain(model.lm_head):
        model.lm_head = DecodeLinear.wrap(model.lm_head)
    return model


def prepare_for_inference(model: Transformer, quantize: Optional[str] = None) -> Transformer:
    """The decoding speed paths for `model`, in place: int8 weights when asked, else fused projections."""
    return quantize_int8(model) if quantize == "int8" else fuse_projections(model)

"""Fused projections: q/k/v (and SwiGLU's gate/up) as one matmul over one weight.

The member layers keep their parameters, re-pointed at row slices of the joined weight (no copy;
in-place updates stay shared), so the model's state dict does not change.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from llmgen.kernels import fp16_weights
from llmgen.kernels.cpu_matmul import decode_layout, linear


class FusedLinear:
    """Callable: x -> the outputs of `layers` for x, computed as one product (with `fp16`, through an
    fp16-packed copy of the joined weight: `fp16_weights.py`). A plain object, not a module, so that
    setting it on the model adds nothing to its parameters or state dict."""

    def __init__(self, layers: Sequence[nn.Linear], fp16: bool = False):
        self.sizes = [m.out_features for m in layers]
        joined = torch.cat([m.weight.detach() for m in layers])
        self.weight = joined if fp16 else decode_layout(joined)  # the column-major layout serves the fp32 split
        self.bias: Optional[torch.Tensor] = None
        if layers[0].bias is not None:
            self.bias = torch.cat([m.bias.detach() for m in layers])
        row = 0
        for m, n in zip(layers, self.sizes):
            m.weight.data = self.weight[row:row + n]
            if self.bias is not None:
                m.bias.data = self.bias[row:row + n]
            row += n
        self.made_from = self.weight.data_ptr()
        self.handle = fp16_weights.pack(self.weight, self.bias, self) if fp16 else None

    def __deepcopy__(self, memo) -> "FusedLinear":
        return fp16_weights.repacked(self, memo)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.handle is not None and fp16_weights.decoding(x):
            return fp16_weights.fp16_linear(x, self.handle, sum(self.sizes)).split(self.sizes, dim=-1)
        return linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def plain(*layers: nn.Module) -> bool:
    """Whether the layers are unwrapped nn.Linear (not LoRA, int8, fp16 or already swapped)."""
    return all(type(m) is nn.Linear for m in layers)

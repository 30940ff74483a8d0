"""Weight-only int8 for decoding: each Linear's weight stored as int8 with one fp scale per output row.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth; int8 weights
are a quarter of fp32's bytes. Activations stay in the model's dtype; on the CPU the matmul runs in
`torch._weight_int8pack_mm` (dequantising on the fly), elsewhere as a plain matmul on the
dequantised weight. Inference only: quantized models are not trained or saved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # (out,): symmetric, per output row
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias: Optional[torch.Tensor] = linear.bias.detach() if linear.bias is not None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(self.scales.dtype).contiguous(), self.weight_int8, self.scales)
        else:
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

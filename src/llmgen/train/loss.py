"""The training objective: next-token cross-entropy, without materialising the logits.

`LanguageModelLoss` wraps a Transformer so that one module call returns the loss; the trainer hands
that module to accelerate, so DDP/FSDP see the whole computation, vocabulary projection included.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmgen.evaluate.perplexity import token_nll


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against targets without the (N, V) logits in memory.

    Rows are taken a chunk at a time; each chunk's logits give its loss and, right away, its
    gradients (softmax - one-hot), which are folded into dL/dh and dL/dweight while the chunk is
    still in cache. Backward only scales them. Same maths and FLOPs as linear + F.cross_entropy,
    a fraction of the memory traffic (the vocabulary projection dominates small models' steps). On the CPU
    rows without a target (a finetune's prompts and padding) are left out of the products altogether."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, kernel):
        dev = h.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        valid = targets != -100
        scale = 1.0 / valid.sum().clamp_min(1).float()
        full, kept = h, None
        if dev == "cpu" and not bool(valid.all()):  # finetuning's prompts and padding: their logits are not needed
            kept = valid.nonzero().squeeze(1)  # (a sync a GPU would wait on: there every row is computed)
            h, targets, valid = h.index_select(0, kept), targets.index_select(0, kept), valid.index_select(0, kept)
        tgt = torch.where(valid, targets, 0)
        weights = valid.float() * scale  # (N,): each row's share of the mean
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # the first chunk's product, then the others added in (no pass zeroing it first)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(mm)
        with torch.autocast(dev, enabled=False):
            for s in range(0, h.shape[0], rows):
                hc = h[s:s + rows].to(mm)
                logits = (hc @ w.t()).float()  # (rows, V)
                part = kernel(logits, tgt[s:s + rows], weights[s:s + rows]) if kernel else None
                if part is None:
                    part = softmax_grad_(logits, tgt[s:s + rows], weights[s:s + rows])
                total += part  # and the logits are now their gradient
                g = logits.to(mm)
                if need_h:
                    grad_h[s:s + rows] = g @ w
                if need_w:
                    if grad_w is not None and mm == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        part_w = (g.t() @ hc).float()
                        grad_w = part_w if grad_w is None else grad_w.add_(part_w)
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        if need_h and kept is not None:  # the rows without a target take no gradient
            grad_h = torch.zeros_like(full).index_copy_(0, kept, grad_h)
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        # scaled in place: a new (vocabulary x width) tensor is ~110 MB at SmolLM2's size, mapped fresh and
        # faulted in page by page each step
        return (grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w.mul_(grad_out.to(grad_w.dtype)) if grad_w is not None else None, None, None, None)


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i * cross-entropy(logits_i, targets_i), returned, with fp32 logits (N, V) turned in place into
    its gradient, weights_i * (softmax(logits_i) - onehot(targets_i)), by torch's ops (the training kernels do it
    in three passes a row, each row in cache: kernels/training.py, `cross_entropy_grad`)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    total = ((lse - logits.gather(1, targets[:, None])).squeeze(1) * weights).sum()
    g = logits.sub_(lse).exp_()  # softmax, in place
    g.scatter_add_(1, targets[:, None], g.new_full((g.shape[0], 1), -1.0)).mul_(weights[:, None])
    return total


def chunk_rows(vocab: int, cuda: bool) -> int:
    """Rows of logits a chunk takes: up to 256 MB of them on a GPU; on a CPU up to 64 MB but never under 512
    rows, as the products lose speed on fewer: each chunk packs the whole (vocabulary x width) weight again for
    MKL, twice (at a 49,152-token vocabulary the loss ran at 57 GFLOP/s with 16 rows a chunk, 151 with 512; at
    4,096, 2,048 rows in one chunk took 112.8 ms where 512-row chunks took 121.4: docs/benchmarks.md)."""
    return max(16, (1 << 28) // (vocab * 4)) if cuda else max(512, (1 << 26) // (vocab * 4))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         kernel: Optional[Callable] = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100), chunked (see _LinearCrossEntropy).
    h (N, C), weight (V, C), targets (N,); 0 when no target is valid. `kernel`, where given, does
    softmax_grad_'s work or returns None where it cannot (then softmax_grad_ runs)."""
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows(weight.shape[0], h.is_cuda), kernel)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) against targets (B, T); -100 targets are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


class LanguageModelLoss(nn.Module):
    """model(x, y, **kw) -> the mean next-token loss. With gradients on and a plain bias-free head it is
    computed chunk by chunk from the hidden states (`linear_cross_entropy`) unless `chunked` is off; in
    evaluation (no gradients) a chunk of rows at a time through the head too (evaluate.perplexity's
    token_nll); otherwise (a wrapped head while training) from the logits. `kernel` is the chunked loss's hook for a kernel
    (see linear_cross_entropy; kernels/training.py sets it)."""

    def __init__(self, model: nn.Module, chunked: bool = True):
        super().__init__()
        self.model, self.chunked, self.kernel = model, chunked, None

    def forward(self, x: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
        head = self.model.lm_head
        if self.chunked and torch.is_grad_enabled() and type(head) is nn.Linear and head.bias is None:
            h = self.model(x, hidden=True, **kw)  # (B, T, C)
            return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, targets.reshape(-1), self.kernel)
        if self.chunked and not torch.is_grad_enabled():
            return token_nll(self.model, x, targets, **kw) / (targets != -100).sum()  # none: nan, as the mean of none
        return cross_entropy(self.model(x, **kw), targets)

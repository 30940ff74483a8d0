"""Fused RMSNorm, RoPE, causal attention, SwiGLU, GELU and the loss's softmax for training on the CPU
(`training.cpp`).

At the small widths people train on a CPU, the llama block's other parts cost as much as its matrix
products: torch runs RMSNorm's backward on the CPU as ~15 separate kernels (it has no fused one there),
RoPE as a roll, two products and a sum each way, SwiGLU as five kernels, its tanh GELU (GPT-2's) is its
slowest elementwise kernel, and its flash attention spends most of its time around small block products
at 64-512 tokens. Each here is one pass each way (attention: one task per head), one autograd node made
in C++; RoPE, attention, SwiGLU and GELU also take bf16 (bf16 autocast's products), computing in fp32 and
rounding once. On the shakespeare-char shape (4 x 128, batch 12 x 64) they took the step from 44 to 37 ms;
docs/benchmarks.md has the measurements. The kernels are built on the first training run on a machine
(`native.py`, ~25 s) and set on the model's `RMSNorm.kernel`, `Attention.rotate`, `Attention.attend`,
`Attention.attend_rope` (RoPE inside the attention kernel), `MLP.swiglu` and `MLP.gelu` hooks; anything
they do not cover (other dtypes or devices, odd head sizes, masks other than finetuning's packed and
padded rows, dropout, a KV cache, long contexts) takes the plain path, so the hooks are safe wherever the
model then runs.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from llmgen.errors import LlmgenError
from llmgen.kernels import native
from llmgen.model import transformer
from llmgen.model.transformer import MLP, Attention, RMSNorm, Transformer, apply_rope

SOURCE = Path(__file__).with_name("training.cpp")
WHAT = "the fused training kernels"


def _plain_cpu(*ts: torch.Tensor, bf16: bool = False) -> bool:
    """fp32 CPU tensors (or bf16 ones, as bf16 autocast's products give the kernels that take them)."""
    kinds = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    return all(t.device.type == "cpu" and t.dtype in kinds for t in ts)


ops = torch.ops.llmgen_training  # filled in when the library is built and loaded


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """RMSNorm of x's rows through the kernel; None where it does not apply (the module's plain path runs)."""
    if not (_plain_cpu(x, weight) and x.is_contiguous() and weight.is_contiguous()):
        return None
    return ops.rms_norm_train(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformer.apply_rope for fp32 or bf16 (B, T, H, D) on the CPU (fp32 tables) through the kernel;
    apply_rope otherwise."""
    if (x.dim() != 4 or x.shape[-1] % 16 or not (_plain_cpu(x, bf16=True) and _plain_cpu(cos, signed_sin))
            or cos.stride(-1) != 1 or signed_sin.stride(-1) != 1):
        return apply_rope(x, cos, signed_sin)
    return ops.rope_train(x, cos, signed_sin)


def _rows(t: torch.Tensor) -> bool:
    """Whether t is rows of its last dimension at one stride (contiguous, or a block of a wider tensor's columns)."""
    try:
        t.view(-1, t.shape[-1])
        return True
    except RuntimeError:
        return False


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformer.swiglu (silu(gate) * up) for fp32 or bf16 CPU tensors of one shape and dtype through the kernel."""
    if not (_plain_cpu(gate, up, bf16=True) and gate.dtype == up.dtype and gate.shape == up.shape
            and gate.stride() == up.stride() and gate.stride(-1) == 1 and _rows(gate)):
        return transformer.swiglu(gate, up)
    return ops.swiglu_train(gate, up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """transformer.gelu (GPT-2's tanh GELU) for a contiguous fp32 or bf16 CPU tensor through the kernel."""
    if not (_plain_cpu(x, bf16=True) and x.is_contiguous()):
        return transformer.gelu(x)
    return ops.gelu_train(x)


class JoinedLinears:
    """q, k and v (or SwiGLU's gate and up) from one product while training: `linears_train` over the bias-free
    nn.Linear modules `names` of `parent`, looked up at each call (a LoRA wrapper put in one's place since makes
    the call run them one by one, as does evaluation or decoding: no backward to come). Their gradients come back
    from the attention and SwiGLU kernels as the blocks of one tensor, so the backward runs two products for
    them all (dW = g^T x, dx accumulated in place), not two each and a sum: 1.4 % of a `small` or `llama-110m`
    step (docs/benchmarks.md). Under bf16 autocast they run in bf16, as nn.Linear would."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        self.parent, self.names = parent, names

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mods = [getattr(self.parent, n) for n in self.names]
        ws = [m.weight for m in mods if type(m) is nn.Linear and m.bias is None]
        if (torch.is_grad_enabled() and len(ws) == len(mods) and _plain_cpu(x, *ws)
                and (x.requires_grad or any(w.requires_grad for w in ws))):
            if not torch.is_autocast_enabled("cpu"):
                return tuple(ops.linears_train(x, ws))
            if torch.get_autocast_dtype("cpu") == torch.bfloat16:
                with torch.autocast("cpu", enabled=False):
                    return tuple(ops.linears_train(x.bfloat16(), [w.bfloat16() for w in ws]))
        return tuple(m(x) for m in mods)


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
    """train.loss.softmax_grad_ through the kernel (contiguous fp32 CPU logits): the weighted cross-entropy sum,
    with the logits turned into its gradient in place; None where it does not apply (softmax_grad_ runs)."""
    if not (_plain_cpu(logits, weights) and logits.is_contiguous() and logits.dim() == 2):
        return None
    return ops.cross_entropy_grad(logits, targets.contiguous(), weights.contiguous())


def grad_norm(grads: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The global 2-norm of `grads` (contiguous fp32 CPU tensors) on every thread, where the library is loaded;
    None otherwise (the caller takes torch's per-tensor norms, which run each tensor on one thread: 17 ms for
    llama-110m's gradients on 2 cores, 9 ms here)."""
    if not (hasattr(ops, "sum_squares") and all(g.device.type == "cpu" and g.dtype == torch.float32
                                                 and g.is_contiguous() for g in grads)):
        return None
    return ops.sum_squares(grads).sqrt()


def adamw_step(opt: torch.optim.AdamW) -> bool:
    """One step of torch's AdamW `opt` through the `adamw_step` kernel: its arithmetic, its state (exp_avg,
    exp_avg_sq, a float32 step count per parameter, made as torch makes them) and its `grad_scale` (the clip
    factor optim.fold_clip puts there), in one parallel loop over every tensor, the gradient only read. torch's
    fused CPU step runs a loop per tensor and writes each divided gradient back: llama-110m's step 58 -> 46 ms on
    2 cores. False (nothing done) unless the library is loaded and every parameter with a gradient is a contiguous
    fp32 CPU tensor in a plain group (no amsgrad, maximize, capturable or tensor lr; no found_inf)."""
    if not hasattr(ops, "adamw_step") or getattr(opt, "found_inf", None) is not None:
        return False
    work = []
    for group in opt.param_groups:
        if (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable")
                or isinstance(group["lr"], torch.Tensor)):
            return False
        ps = [p for p in group["params"] if p.grad is not None]
        if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.layout == torch.strided
                   for p in ps for t in (p, p.grad)):
            return False
        work.append((group, ps))
    with torch.no_grad():
        for group, ps in work:
            if not ps:
                continue
            states = [opt.state[p] for p in ps]
            for p, st in zip(ps, states):
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            ops.adamw_step(ps, [p.grad for p in ps], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                           steps, group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
                           getattr(opt, "grad_scale", None))
    return True


# Past this many tokens torch's flash kernel, which tiles the keys, is the faster (docs/benchmarks.md).
ATTENTION_MAX_LEN = 512


_starts_of: tuple = (None, None)  # (the last mask seen, its first keys): every layer gets the same mask


def first_keys(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, T) int64: each query's first key, where the (B, 1, T, T) bool mask lets each query see exactly the keys
    from that one to itself (SFT's packed and padded rows: data.sft.segment_mask); None for any other mask."""
    global _starts_of
    if _starts_of[0] is mask:
        return _starts_of[1]
    starts = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]:
        first = mask[:, 0].to(torch.uint8).argmax(-1)  # (B, T): the first key each query may see
        j = torch.arange(mask.shape[3])
        if torch.equal(mask[:, 0], (j >= first[..., None]) & (j <= j[:, None])):
            starts = first.contiguous()
    _starts_of = (mask, starts)
    return starts


def _kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    p: float) -> tuple[bool, Optional[torch.Tensor]]:
    """(whether the attention kernel takes these, each query's first key where the mask gives them): no mask or
    one that keeps each query to a run of keys ending at itself (packed or padded finetuning rows), no dropout,
    as many keys as queries (no cache) up to ATTENTION_MAX_LEN, fp32 or bf16 CPU tensors, head size a multiple
    of 16."""
    T, D = q.shape[2], q.shape[3]
    if (p > 0 or k.shape[2] != T or T > ATTENTION_MAX_LEN or D % 16 or not _plain_cpu(q, k, v, bf16=True)
            or not q.dtype == k.dtype == v.dtype or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
        return False, None
    if mask is None:
        return True, None
    starts = first_keys(mask) if mask.device.type == "cpu" and mask.shape[0] == q.shape[0] else None
    return starts is not None, starts


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """transformer.attend through the causal kernel where it applies (`_kernel_applies`)."""
    applies, starts = _kernel_applies(q, k, v, mask, p)
    if not applies:
        return transformer.attend(q, k, v, mask, p)
    return ops.attention_train(q, k, v, q.shape[3] ** -0.5, starts)


def attend_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor], p: float) -> Optional[torch.Tensor]:
    """apply_rope on q and k, then transformer.attend, as one kernel: q and k come in unrotated and the kernel
    rotates them as it reads them (their gradients leave through the inverse rotation), a pass over each fewer
    both ways than the RoPE kernel before attention. None where it does not apply (the model then rotates and
    attends itself)."""
    cos, sin = rope
    applies, starts = _kernel_applies(q, k, v, mask, p)
    if not (applies and _plain_cpu(cos, sin) and cos.stride(-1) == 1 and sin.stride(-1) == 1):
        return None
    return ops.attention_train(q, k, v, q.shape[3] ** -0.5, starts, cos, sin)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the system (for the
    rest of the process: the trainer and `llmgen eval`'s perplexity call it; a server does not).

    By default it maps every block over 128 KB-32 MB fresh from the kernel and unmaps it on free, so each
    training step faults its activations and gradients back in page by page (~600 faults a step at the
    shakespeare-char shape, ~1 ms of 40; at SmolLM2's size the (vocabulary x width) gradients and the
    loss's logits, 100-113 MB each, ~5 % of the step). Every block now comes from the heap (no mmap: glibc
    cannot be told to keep blocks over 32 MB otherwise), and up to 1 GB of free heap stays mapped: memory is
    reused across steps, and the peak grows by what fragmentation costs (~3-7 % measured). glibc only
    (elsewhere nothing happens and this returns False)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def missing() -> Optional[str]:
    return native.missing(WHAT)


def enable(model: nn.Module, loss: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None) -> str:
    """Set the kernels on the RMSNorm, attention and MLP modules in `model` (a Transformer or a wrapper of
    one), the cross-entropy kernel on `loss` (a train.loss.LanguageModelLoss: its `kernel` hook) and the AdamW
    step and clip norm on `optimizer` (train.optim.AdamW: its `cpu_kernels` flag), building them on first use;
    returns what the run uses, for its start line. Where they cannot run, the model keeps torch's ops and the
    line says why; a failed build is reported the same way, never an error (training runs without them)."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    rope = any(isinstance(m, Transformer) and m.cfg.positions == "rope" for m in model.modules())
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    parts = [name for name, used in (("RMSNorm", norms), ("RoPE", attns if rope else []), ("attention", attns),
                                     ("SwiGLU", [m for m in mlps if m.gated]), ("GELU", [m for m in mlps if not m.gated]),
                                     ("cross-entropy", [loss] if loss is not None else []),
                                     ("AdamW", [optimizer] if hasattr(optimizer, "cpu_kernels") else []))
             if used]
    if not parts:
        return "torch's ops (nothing to fuse)"
    why = missing()
    if why is None:
        try:
            native.build(SOURCE, WHAT, 25)
        except LlmgenError as e:
            why = str(e)
    if why:
        return f"torch's elementwise ops ({why})"
    for m in norms:
        m.kernel = rms_norm
    for m in attns:
        m.rotate, m.attend, m.attend_rope = rotate, attend, attend_rope
        m.fused_qkv = m.fused_qkv or JoinedLinears(m, ("wq", "wk", "wv"))
    for m in mlps:
        m.swiglu, m.gelu = swiglu, gelu
        if m.gated:
            m.fused_gate_up = m.fused_gate_up or JoinedLinears(m, ("w1", "w3"))
    if loss is not None:
        loss.kernel = cross_entropy_grad
    if hasattr(optimizer, "cpu_kernels"):
        optimizer.cpu_kernels = True
    return f"fused {'/'.join(parts)} kernels"

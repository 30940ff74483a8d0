"""The whole network in one file: a decoder-only Transformer, Llama- or GPT-2-style.

`model.arch` picks the variant (architecture as data, as in litgpt):
  llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head), no biases
  gpt2:  learned absolute positions, LayerNorm, GELU MLP, biases
Both are pre-norm residual stacks with optional tied embeddings, dropout, and
`scaled_dot_product_attention` with causal masking. Shapes are in the comments:
B batch, T time (new tokens), S time incl. cached tokens, C d_model, nh heads, nkv KV heads,
hs head size, V vocab.

A `KVCache` (preallocated, written in place) makes incremental decoding cheap: call the model
on the prompt with `cache=` and `pos=0` (prefill), then on each new token with its position.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmgen.config import ModelConfig


def ffn_hidden(cfg: ModelConfig) -> int:
    """MLP width: explicit d_ff, else 4*C (gpt2) or ~8/3*C rounded up to a multiple of 64 (llama)."""
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.arch == "gpt2":
        return 4 * cfg.d_model
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; normalise in fp32 for stability under bf16 autocast
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_size: int, max_len: int, theta: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, hs) for rotary embeddings in the rotate-half layout (HF Llama's), which
    rotates the pairs (i, i + hs/2). The sin table's first half is negated so that `apply_rope` needs
    only a roll. `scale` > 1 is linear position interpolation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32) / scale, inv_freq)  # (L, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hs)
    sign = torch.cat([-torch.ones(head_size // 2), torch.ones(head_size // 2)])
    return angles.cos(), angles.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hs) by the angles in cos/signed_sin (from `rope_tables`, broadcastable to x):
    x * cos + (-x2, x1) * sin, where roll(x) = (x2, x1) and the sign lives in the table."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys and values, one (B, nkv, max_len, hs) tensor per layer. Separate tensors, not
    one (n_layer, ...) block: the compiled decode step then updates each layer's cache in place
    (a write into a slice of one shared input makes inductor copy the whole block per layer)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        nkv = cfg.n_kv_head or cfg.n_head
        hs = cfg.d_model // cfg.n_head
        shape = (batch, nkv, max_len, hs)
        return cls(*([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)] for _ in "kv"))

    def reorder(self, src: torch.Tensor, length: int) -> None:
        """Row b of every layer's first `length` slots becomes row src[b] (beam search), in place."""
        for t in (*self.k, *self.v):
            t[:, :, :length] = t[src, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_kv = cfg.n_kv_head or cfg.n_head
        self.hs = cfg.d_model // cfg.n_head
        bias = cfg.arch == "gpt2"
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, self.n_head * self.hs, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hs, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hs, bias=qkv_bias)
        self.wo = nn.Linear(self.n_head * self.hs, cfg.d_model, bias=bias)
        self.use_rope = cfg.arch == "llama"
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.wqkv: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # set by fuse()

    def fuse(self) -> bool:
        """Re-point wq/wk/wv at row slices of one (q+k+v, C) matrix so projecting is one matmul (no
        copy of the weights; in-place updates stay shared). Skipped when a projection is wrapped,
        e.g. by an unmerged LoRA adapter."""
        if self.wqkv is not None:
            return True
        lins = (self.wq, self.wk, self.wv)
        if any(type(m) is not nn.Linear for m in lins):
            return False
        self.wqkv = _fuse_linears(lins)
        return True

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                cache: Optional[KVCache] = None, pos: int = 0,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv, self.hs
        wb = _joined(self.wqkv, (self.wq, self.wk, self.wv))
        if wb is not None:  # one matmul for q, k and v
            qkv = linear(x, *wb).view(B, T, nh + 2 * nkv, hs)
            if self.use_rope:  # rotate q and k together
                qk = apply_rope(qkv[:, :, :nh + nkv], *rope)
                q, k = qk.split([nh, nkv], dim=2)
            else:
                q, k = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv]
            v = qkv[:, :, nh + nkv:]
        else:
            q = self.wq(x).view(B, T, nh, hs)  # (B, T, nh, hs)
            k = self.wk(x).view(B, T, nkv, hs)  # (B, T, nkv, hs)
            v = self.wv(x).view(B, T, nkv, hs)
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
        if cache is not None and isinstance(pos, torch.Tensor):
            # static shapes (the compiled decode step): write slots `pos` (T,), attend over the whole
            # cache; attn_mask hides the slots not written yet
            ck, cv = cache.k[self.layer], cache.v[self.layer]
            ck.index_copy_(2, pos, k)
            cv.index_copy_(2, pos, v)
            k, v = ck, cv  # (B, nkv, S_max, hs)
        elif cache is not None:
            ck, cv = cache.k[self.layer], cache.v[self.layer]
            ck[:B, :, pos:pos + T] = k
            cv[:B, :, pos:pos + T] = v
            k = ck[:B, :, :pos + T]  # (B, nkv, S, hs)
            v = cv[:B, :, :pos + T]
        drop = self.dropout if self.training else 0.0
        S = k.shape[2]
        if T == 1 and S > 1:
            # one new token sees everything cached (attn_mask, if any, only hides padding). With GQA,
            # the rep query heads that share a KV head ride in the query-length slot: no K/V copies.
            y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hs), k, v, attn_mask=attn_mask,
                                               dropout_p=drop)  # (B, nkv, rep, hs)
            return _drop(self.resid_drop, project(self.wo, y.reshape(B, 1, nh * hs)))
        if nkv != nh:  # grouped-query attention: each KV head serves n_head/n_kv query heads
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:  # several new tokens after a cached prefix: causal within the new block
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return _drop(self.resid_drop, project(self.wo, y))


def _joined(fused, lins) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Weight (and bias) for projecting through `lins` with one matmul: the fused copy from fuse()
    when gradients are off, else the layers' weights concatenated (gradients flow back to each;
    the copy is small next to the activations); None when a layer is wrapped (LoRA, int8), which
    then runs on its own."""
    if fused is not None and not torch.is_grad_enabled():
        return fused
    if any(type(m) is not nn.Linear for m in lins):
        return None
    b = torch.cat([m.bias for m in lins]) if lins[0].bias is not None else None
    return torch.cat([m.weight for m in lins]), b


def _fuse_linears(lins) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One weight (and bias) holding the given Linear layers' rows, which become views of it
    (column-major on the CPU, see `linear`)."""
    w = _decode_layout(torch.cat([m.weight.detach() for m in lins]))
    b = torch.cat([m.bias.detach() for m in lins]) if lins[0].bias is not None else None
    row = 0
    for m in lins:
        n = m.out_features
        m.weight.data = w[row:row + n]
        if b is not None:
            m.bias.data = b[row:row + n]
        row += n
    return w, b


def _decode_layout(w: torch.Tensor) -> torch.Tensor:
    """On a CPU where `linear`'s split product pays (see `split_pays`), the same (out, in) weight stored
    column-major, i.e. a view of a contiguous (in, out) tensor; elsewhere unchanged."""
    return w.t().contiguous().t() if w.device.type == "cpu" and split_pays() else w


@functools.lru_cache(maxsize=None)
def split_pays() -> bool:
    """Whether this CPU's BLAS runs a one-row matrix product on one core (measured once per process):
    then `linear` splits decoding products across the threads itself. Some BLAS builds thread it
    (MKL on recent Intel CPUs: 2 threads ~1.9x faster than 1), some do not (the same MKL on AMD: no
    faster with 2 threads); there the split reads the weights 2.6-3x faster on 2 cores."""
    threads = torch.get_num_threads()
    if threads < 2:
        return False
    w, x = torch.ones(2048, 1024), torch.ones(1, 1024)  # 8 MB: past the private caches; no RNG draws

    def best(n: int) -> float:
        torch.set_num_threads(n)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t0)
        return min(times)

    try:
        with torch.no_grad():
            one, every = best(1), best(threads)
    finally:
        torch.set_num_threads(threads)
    return every > 0.7 * one  # the other threads did not help


def _split_product(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """x @ w.T for a column-major w, as `parts` blocks of input features (one per thread) in one bmm,
    partial products summed."""
    out, inn = w.shape
    k = inn // parts
    xs = x.reshape(-1, parts, k).transpose(0, 1)  # (parts, rows, in/parts)
    return torch.bmm(xs, w.t().view(parts, k, out)).sum(0).view(*x.shape[:-1], out)


# The same product as an opaque operator for torch.compile: inductor would otherwise lower the bmm
# and the sum into its own loops (slower than eager on `small`, measured) instead of calling BLAS.
_split_op = torch.library.custom_op("llmgen::split_linear", _split_product, mutates_args=(),
                                    schema="(Tensor x, Tensor w, int parts) -> Tensor")
_split_op.register_fake(lambda x, w, parts: x.new_empty(*x.shape[:-1], w.shape[0]))


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, w, b). When decoding on the CPU (a few rows, no gradients) with a column-major weight
    from `Transformer.fuse` (only where `split_pays`), each thread multiplies its own contiguous block
    of the weight's rows (a slice of the input features) and the partial products are summed. Equal to
    F.linear up to float rounding (the sum runs in a different order)."""
    out, inn = w.shape
    if w.stride(0) == 1 and out * inn >= 1 << 18 and x.device.type == "cpu" and x.numel() <= 64 * inn \
            and not torch.is_grad_enabled():  # from 1 MB of fp32 weights; smaller ones stay in cache
        parts = torch.get_num_threads()
        while inn % parts:  # as many equal blocks as threads, or the nearest count below that divides
            parts -= 1
        if parts > 1:
            y = (_split_op if torch.compiler.is_compiling() else _split_product)(x, w, parts)
            return y if b is None else y + b
    return F.linear(x, w, b)


def _drop(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """Dropout only where it acts (training, p > 0): decoding skips the module calls."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) through `linear` for a plain Linear; wrapped layers (LoRA, int8) run themselves."""
    return linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.gated = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=bias)  # gate (llama) / up (gpt2)
        if self.gated:
            self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=bias)  # down
        self.drop = nn.Dropout(cfg.dropout)
        self.w13: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # set by fuse()

    def fuse(self) -> bool:
        """Gate and up projections as one matmul (see Attention.fuse)."""
        if self.w13 is None and self.gated and type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            self.w13 = _fuse_linears((self.w1, self.w3))
        return self.w13 is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU, gate and up as one matmul where the layers allow
            wb = _joined(self.w13, (self.w1, self.w3))
            if wb is not None:
                gate, up = linear(x, *wb).chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.gelu(self.w1(x), approximate="tanh")  # GPT-2's GELU
        return _drop(self.drop, project(self.w2, h))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against targets without the (N, V) logits in memory.

    Rows are taken a chunk at a time; each chunk's logits give its loss and, right away, its
    gradients (softmax - one-hot), which are folded into dL/dh and dL/dweight while the chunk is
    still in cache. Backward only scales them. Same maths and FLOPs as linear + F.cross_entropy,
    a fraction of the memory traffic (the vocabulary projection dominates small models' steps)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        dev = h.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        valid = targets != -100
        scale = 1.0 / valid.sum().clamp_min(1).float()
        tgt = torch.where(valid, targets, 0)
        weights = (valid.float() * scale).unsqueeze(1)  # (N, 1): each row's share of the mean
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(mm)
        with torch.autocast(dev, enabled=False):
            for s in range(0, h.shape[0], rows):
                hc, tc = h[s:s + rows].to(mm), tgt[s:s + rows, None]
                logits = (hc @ w.t()).float()  # (rows, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += ((lse - logits.gather(1, tc)) * weights[s:s + rows]).sum()
                g = logits.sub_(lse).exp_()  # softmax, in place
                g.scatter_add_(1, tc, g.new_full(tc.shape, -1.0)).mul_(weights[s:s + rows])
                g = g.to(mm)
                if need_h:
                    grad_h[s:s + rows] = g @ w
                if need_w:
                    if mm == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w += (g.t() @ hc).float()
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100), chunked (see _LinearCrossEntropy).
    h (N, C), weight (V, C), targets (N,); 0 when no target is valid."""
    per_row = weight.shape[0] * 4
    budget = (1 << 28) if h.is_cuda else (1 << 21)  # bytes of fp32 logits per chunk
    return _LinearCrossEntropy.apply(h, weight, targets, max(16, budget // per_row))


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache=None, pos=0, attn_mask=None):
        x = x + self.attn(self.norm1(x), rope, cache, pos, attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling_factor)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 / Llama practice: residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.wo.weight") or name.endswith("mlp.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def fuse(self) -> "Transformer":
        """Inference speed-up: q/k/v and gate/up projections each become one matmul (views, no extra
        memory), and on the CPU every projection's weight is stored column-major for `linear`. Call
        after moving the model to its device and dtype; used when gradients are off."""
        for block in self.blocks:
            block.attn.fuse()
            block.mlp.fuse()
        for layer in [m for b in self.blocks for m in (b.attn.wo, b.mlp.w2)] + [self.lm_head]:
            if type(layer) is nn.Linear:  # the column-major layout for `linear`
                layer.weight.data = _decode_layout(layer.weight.data)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention's 12*L*C*T (PaLM appendix B)."""
        c = self.cfg
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * seq_len

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, pos: int = 0,
                attn_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, last_only: bool = False
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """idx (B, T) token ids written at cache slots pos..pos+T-1 -> logits (B, T, V), and the mean
        loss when targets (B, T) are given (positions with target -100 are ignored). With targets and
        gradients on (training), the loss comes from `linear_cross_entropy` and logits are None.

        By default token t sits at position pos+t. `positions` (B, T) overrides that per row (left-padded
        batches, packed examples that restart at 0); `attn_mask` (B, 1, T, S) bool, True = may attend,
        then replaces causal masking. `last_only` computes logits for the last position only (B, 1, V).
        With `pos` a tensor of cache slots, shapes stay static for torch.compile (see Attention)."""
        B, T = idx.shape
        static = isinstance(pos, torch.Tensor)  # pos = cache slots (T,); positions (B, T) must be given
        if not static and pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device) if positions is None else positions)
        elif positions is None:
            rope = (self.rope_cos[pos:pos + T, None], self.rope_sin[pos:pos + T, None])  # (T, 1, hs) each
        else:
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))  # (B, T, 1, hs)
        x = _drop(self.drop, x)
        for block in self.blocks:
            x = block(x, rope, cache, pos, attn_mask)
        x = self.norm_f(x[:, -1:] if last_only else x)
        if targets is not None and torch.is_grad_enabled() and type(self.lm_head) is nn.Linear \
                and self.lm_head.bias is None:
            # training: loss and its gradients chunk by chunk, the logits never materialised
            return None, linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        logits = project(self.lm_head, x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

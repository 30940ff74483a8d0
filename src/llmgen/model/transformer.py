"""The whole network in one file: a decoder-only Transformer, Llama- or GPT-2-style.

`ModelConfig` picks the variant's parts once (architecture as data, as in litgpt):
  llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head), no biases
  gpt2:  learned absolute positions, LayerNorm, GELU MLP, biases
Both are pre-norm residual stacks with optional tied embeddings and dropout. Shapes are in the
comments: B batch, T new tokens, S tokens attended to (cached + new), C d_model, nh heads,
nkv KV heads, hs head size, V vocab.

Decoding: call the model on the prompt with a `KVCache` and `pos=0` (prefill), then on each new
token with its position. Speed paths (fused projections, CPU decode matmuls, int8 weights) live in
`llmgen.kernels` and are applied from outside; the training loss lives in `llmgen.train.loss`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmgen.config import ModelConfig
from llmgen.model.kv_cache import KVCache

Rope = Optional[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = None  # kernels.training: a fused CPU kernel with its own backward (None where it does not apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x, self.weight, self.eps) if self.kernel else None
        # normalise in fp32 for stability under bf16 autocast
        return y if y is not None else F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_tables(head_size: int, max_len: int, theta: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, hs) for rotary embeddings in the rotate-half layout (HF Llama's), which
    rotates the pairs (i, i + hs/2). The sin table's first half is negated so that `apply_rope` needs
    only a roll. `scale` > 1 is linear position interpolation. Made on the CPU whatever the default device."""
    cpu = torch.device("cpu")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32, device=cpu) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=cpu) / scale, inv_freq)  # (L, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hs)
    sign = torch.cat([-torch.ones(head_size // 2, device=cpu), torch.ones(head_size // 2, device=cpu)])
    return angles.cos(), angles.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hs) by the angles in cos/signed_sin (from `rope_tables`, broadcastable to x):
    x * cos + (-x2, x1) * sin, where roll(x) = (x2, x1) and the sign lives in the table."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin).type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's GELU


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """Dropout only where it acts (training, p > 0): decoding skips the module calls."""
    return module(x) if module.training and module.p > 0 else x


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, nkv, S, hs) -> (B, nh, T, hs).
    mask (B, 1, T, S) bool, True = may attend; None = causal (the T new tokens are the last of S)."""
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if T == 1:  # one new token sees every slot given (a mask only hides padding); the query heads that
        # share a KV head ride in the query-length slot, so K and V are not repeated for GQA
        y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hs), k, v, attn_mask=mask, dropout_p=p)
        return y.reshape(B, nh, 1, hs)
    if nkv != nh:  # grouped-query attention: each KV head serves nh/nkv query heads
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
    if mask is None and S > T:  # new tokens after a cached prefix: causal within the new block
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hs = layer, cfg.n_head, cfg.n_kv, cfg.head_size
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_size, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv * cfg.head_size, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv * cfg.head_size, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_size, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.fused_qkv = None  # kernels.fuse_projections: q, k and v from one matmul
        self.attend = attend  # kernels.quantize_blockwise: a decoding attention kernel
        self.rotate = apply_rope  # kernels.training: a fused RoPE kernel with its own backward
        self.attend_rope = None  # kernels.training: RoPE inside the attention kernel (None where it does not apply)

    def forward(self, x: torch.Tensor, rope: Rope, cache: Optional[KVCache] = None,
                pos: Union[int, torch.Tensor] = 0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.fused_qkv(x) if self.fused_qkv else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(B, T, self.n_head, self.hs)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv, self.hs)  # (B, T, nkv, hs)
        v = v.view(B, T, self.n_kv, self.hs)
        p = self.resid_drop.p if self.training else 0.0
        y = None
        if self.attend_rope is not None and rope is not None and cache is None:
            y = self.attend_rope(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rope, mask, p)
        if y is None:
            if rope is not None:
                q, k = self.rotate(q, *rope), self.rotate(k, *rope)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
            if cache is not None:
                k, v = cache.update(self.layer, pos, k, v)  # (B, nkv, S, hs)
            y = self.attend(q, k, v, mask, p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)  # (B, T, C)
        return dropout(self.resid_drop, self.wo(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)  # gate (swiglu) / up (gelu)
        if self.gated:
            self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)  # down
        self.drop = nn.Dropout(cfg.dropout)
        self.fused_gate_up = None  # kernels.fuse_projections: gate and up from one matmul
        self.swiglu, self.gelu = swiglu, gelu  # kernels.training: fused kernels with their own backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU
            gate, up = self.fused_gate_up(x) if self.fused_gate_up else (self.w1(x), self.w3(x))
            h = self.swiglu(gate, up)  # (B, T, hidden)
        else:
            h = self.gelu(self.w1(x))
        return dropout(self.drop, self.w2(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope, cache=None, pos=0, mask=None):
        x = x + self.attn(self.norm1(x), rope, cache, pos, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rope_cos", None, persistent=False)  # (max_seq_len, hs) tables, llama only
        self.register_buffer("rope_sin", None, persistent=False)
        self.reset_rope()
        self.apply(self._init_weights)
        # GPT-2 / Llama practice: residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def reset_rope(self) -> None:
        """(Re)build the rotary tables, e.g. after materialising a model made on the meta device."""
        c = self.cfg
        if c.positions == "rope":
            cos, sin = rope_tables(c.head_size, c.max_seq_len, c.rope_theta, c.rope_scaling_factor)
            where = self.tok_emb.weight.device
            self.rope_cos, self.rope_sin = cos.to(where), sin.to(where)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per trained weight (6N, PaLM appendix B), 4 per frozen
        one (no weight gradient: a finetune's frozen base, LoRA's; an upper bound where nothing below it trains),
        plus attention's 12*L*C*T."""
        c = self.cfg
        n = sum((6 if p.requires_grad else 4) * p.numel() for name, p in self.named_parameters()
                if not name.startswith("pos_emb."))  # as num_params(non_embedding=True)
        return n + 12 * c.n_layer * c.d_model * seq_len

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None, pos: Union[int, torch.Tensor] = 0,
                attn_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """idx (B, T) token ids, written at cache slots pos..pos+T-1 -> logits (B, T, V), or with
        `hidden` the final normalised hidden states (B, T, C) (the training loss projects them itself).

        Token t sits at position pos+t unless `positions` (B, T) says otherwise (left-padded batches,
        packed examples that restart at 0); `attn_mask` (B, 1, T, S) bool, True = may attend, then
        replaces causal masking. `last_only` keeps the last position only (B, 1, ...). With `pos` a
        tensor of cache slots (T,), shapes stay static for torch.compile (see KVCache)."""
        B, T = idx.shape
        if not isinstance(pos, torch.Tensor) and pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device) if positions is None else positions)
        elif positions is None:  # rotary tables broadcast over the heads: (T, 1, hs) ...
            rope = (self.rope_cos[pos:pos + T, None], self.rope_sin[pos:pos + T, None])
        else:  # ... or per row, (B, T, 1, hs)
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))
        x = dropout(self.drop, x)
        for block in self.blocks:
            x = block(x, rope, cache, pos, attn_mask)
        x = self.norm_f(x[:, -1:] if last_only else x)  # (B, T, C)
        return x if hidden else self.lm_head(x)  # (B, T, V)

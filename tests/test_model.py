import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llmgen.config import build_config
from llmgen.model import transformer
from llmgen.model.transformer import (KVCache, Transformer, _LinearCrossEntropy, apply_rope, ffn_hidden, linear,
                                      linear_cross_entropy, rope_tables)


def make(arch="llama", **kw):
    cfg = build_config({"model": {"preset": "tiny", "arch": arch, "vocab_size": 97, "max_seq_len": 64, **kw}}).model
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shapes_and_loss(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        logits, loss = m(idx, targets=torch.randint(0, 97, (3, 20)))
    assert logits.shape == (3, 20, 97)
    assert abs(loss.item() - math.log(97)) < 0.3  # fresh init predicts ~uniformly


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_loss_and_gradients_match_plain_cross_entropy(arch):
    # with gradients on, the loss is computed chunk by chunk without logits (linear_cross_entropy)
    m = make(arch, d_model=64, n_head=4, n_kv_head=2)
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[0, :5] = -100  # ignored positions (prompt tokens in finetuning)
    logits, loss = m(idx, targets=targets)
    assert logits is None
    loss.backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    plain = F.cross_entropy(m(idx)[0].view(-1, 97), targets.view(-1), ignore_index=-100)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for n, p in m.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_linear_cross_entropy_chunks_and_scales_like_the_reference():
    torch.manual_seed(0)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (50,))
    t[::3] = -100
    loss = _LinearCrossEntropy.apply(h, w, t, 7)  # 7 rows per chunk: uneven last chunk
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    (2.5 * ref).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)
    assert linear_cross_entropy(h, w, torch.full((50,), -100)).item() == 0.0  # nothing to predict


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causality(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, _ = m(idx)
    b, _ = m(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_rope_matches_direct_formula():
    hs, T, theta = 8, 5, 10000.0
    cos, sin = rope_tables(hs, T, theta)
    x = torch.randn(1, 1, T, hs)
    got = apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for t in range(T):
        for i in range(hs // 2):
            ang = t * theta ** (-2 * i / hs)
            a, b = x[0, 0, t, i], x[0, 0, t, i + hs // 2]
            want[0, 0, t, i] = a * math.cos(ang) - b * math.sin(ang)
            want[0, 0, t, i + hs // 2] = b * math.cos(ang) + a * math.sin(ang)
    assert torch.allclose(got, want, atol=1e-5)
    # rotation preserves norms, and relative position is all that matters for q.k
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(n_head=4, n_kv_head=2)
    mha = make(n_head=4, n_kv_head=4)
    sd = gqa.state_dict()
    hs = gqa.cfg.d_model // 4
    for k, v in list(sd.items()):
        if k.endswith("attn.wk.weight") or k.endswith("attn.wv.weight"):
            heads = v.view(2, hs, -1)
            sd[k] = heads.repeat_interleave(2, dim=0).reshape(4 * hs, -1)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 12))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_matches_full_forward(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (2, 24))
    full, _ = m(idx)
    cache = KVCache.allocate(m.cfg, batch=2, max_len=64)
    with torch.no_grad():
        pre, _ = m(idx[:, :10], cache=cache, pos=0)  # prefill
        chunk, _ = m(idx[:, 10:14], cache=cache, pos=10)  # several new tokens at once
        steps = [m(idx[:, t:t + 1], cache=cache, pos=t)[0] for t in range(14, 24)]  # one at a time
    inc = torch.cat([pre, chunk, *steps], dim=1)
    assert torch.allclose(inc, full, atol=1e-5)


def test_init_scales_residual_projections_and_ties():
    m = make(n_layer=2)
    assert m.lm_head.weight is m.tok_emb.weight
    std = m.blocks[0].attn.wo.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.003
    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_presets_param_counts():
    def count(preset, vocab):
        cfg = dataclasses.replace(build_config({"model": {"preset": preset}}).model, vocab_size=vocab)
        with torch.device("meta"):
            return Transformer(cfg).num_params()

    assert 0.5e6 < count("tiny", 4096) < 1.5e6
    assert 8e6 < count("small", 4096) < 14e6
    assert 120e6 < count("gpt2-124m", 50257) < 128e6
    assert 95e6 < count("llama-110m", 32000) < 125e6


def test_ffn_hidden():
    cfg = build_config({"model": {"preset": "small"}}).model
    assert ffn_hidden(cfg) == 1024
    assert ffn_hidden(dataclasses.replace(cfg, arch="gpt2")) == 4 * 384


@pytest.mark.parametrize("rows,bias,inn,threads", [(1, False, 384, 2), (8, True, 384, 2), (3, False, 384, 2),
                                                     (1, False, 1000, 3)])
def test_split_linear_equals_linear(rows, bias, inn, threads, monkeypatch):
    """The decode-time CPU matmul (a block of input features per thread, in one bmm, partial sums added)
    is F.linear, also when the thread count does not divide the features."""
    torch.manual_seed(0)
    w = torch.randn(1024, inn)
    b = torch.randn(1024) if bias else None
    x = torch.randn(1, rows, inn)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, c: calls.append(a.shape[0]) or bmm(a, c))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            got = linear(x, w.t().contiguous().t(), b)
        assert calls == [threads if inn % threads == 0 else 2]  # the split path ran, one block per thread
        assert got.shape == (1, rows, 1024)
        assert torch.allclose(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("split", [True, False])
def test_fused_model_matches_unfused(split, monkeypatch):
    """fuse() (joined projections; column-major weights where the split product pays) changes speed,
    not logits or cached decoding."""
    monkeypatch.setattr(transformer, "split_pays", lambda: split)
    torch.manual_seed(0)
    cfg = build_config({"model": {"preset": None, "arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                  "d_model": 256, "max_seq_len": 64, "vocab_size": 1024}}).model
    plain = Transformer(cfg).eval()
    fused = Transformer(cfg).eval()
    fused.load_state_dict(plain.state_dict())
    fused.fuse()
    assert (fused.blocks[0].mlp.w2.weight.stride(0) == 1) == split  # column-major only for the split
    idx = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        full, _ = plain(idx)
        cache = KVCache.allocate(cfg, 1, 64)
        fused(idx[:, :8], cache=cache, pos=0)
        steps = [fused(idx[:, t:t + 1], cache=cache, pos=t)[0][:, -1] for t in range(8, 12)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 8:], atol=1e-4, rtol=1e-4)


def test_split_pays_probe_keeps_thread_count():
    """The one-time BLAS probe restores the thread count, and with one thread there is nothing to split."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        transformer.split_pays.cache_clear()
        assert transformer.split_pays() is False
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        transformer.split_pays.cache_clear()
        assert isinstance(transformer.split_pays(), bool)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
        transformer.split_pays.cache_clear()

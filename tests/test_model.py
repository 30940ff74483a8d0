import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from llmgen.config import build_config
from llmgen.model.checkpoint import build_model
from llmgen.model.kv_cache import KVCache
from llmgen.model.transformer import Transformer, apply_rope, rope_tables
from llmgen.train.loss import LanguageModelLoss, _LinearCrossEntropy, cross_entropy, linear_cross_entropy


def make(arch="llama", **kw):
    cfg = build_config({"model": {"preset": "tiny", "arch": arch, "vocab_size": 97, "max_seq_len": 64, **kw}}).model
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shapes_and_loss(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        logits = m(idx)
        loss = LanguageModelLoss(m)(idx, targets)
    assert logits.shape == (3, 20, 97) and m(idx, hidden=True).shape == (3, 20, m.cfg.d_model)
    assert torch.allclose(loss, cross_entropy(logits, targets))
    assert abs(loss.item() - math.log(97)) < 0.3  # fresh init predicts ~uniformly


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_loss_and_gradients_match_plain_cross_entropy(arch):
    # with gradients on, the loss is computed chunk by chunk without logits (linear_cross_entropy)
    m = make(arch, d_model=64, n_head=4, n_kv_head=2)
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[0, :5] = -100  # ignored positions (prompt tokens in finetuning)
    loss = LanguageModelLoss(m)(idx, targets)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    plain = F.cross_entropy(m(idx).view(-1, 97), targets.view(-1), ignore_index=-100)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for n, p in m.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4), n
    m.zero_grad()  # the unchunked objective (used compiled on a GPU) is the same function
    unchunked = LanguageModelLoss(m, chunked=False)(idx, targets)
    unchunked.backward()
    assert abs(unchunked.item() - plain.item()) < 1e-6
    assert all(torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4) for n, p in m.named_parameters())


def test_linear_cross_entropy_chunks_and_scales_like_the_reference():
    torch.manual_seed(0)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (50,))
    t[::3] = -100
    loss = _LinearCrossEntropy.apply(h, w, t, 7, None)  # 7 rows per chunk: uneven last chunk
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    (2.5 * ref).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)
    assert linear_cross_entropy(h, w, torch.full((50,), -100)).item() == 0.0  # nothing to predict


def test_flops_per_token_counts_frozen_weights_without_their_gradient():
    m = make("llama")
    c, T = m.cfg, 16
    attention = 12 * c.n_layer * c.d_model * T
    assert m.flops_per_token(T) == 6 * m.num_params(non_embedding=True) + attention
    for p in m.blocks.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in m.blocks.parameters())
    assert m.flops_per_token(T) == 6 * (m.num_params(non_embedding=True) - frozen) + 4 * frozen + attention


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causality(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a = m(idx)
    b = m(changed)
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
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_matches_full_forward(arch):
    m = make(arch)
    idx = torch.randint(0, 97, (2, 24))
    full = m(idx)
    cache = KVCache.allocate(m.cfg, batch=2, max_len=64)
    with torch.no_grad():
        pre = m(idx[:, :10], cache=cache, pos=0)  # prefill
        chunk = m(idx[:, 10:14], cache=cache, pos=10)  # several new tokens at once
        steps = [m(idx[:, t:t + 1], cache=cache, pos=t) for t in range(14, 24)]  # one at a time
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
    assert cfg.ffn_hidden == 1024
    assert dataclasses.replace(cfg, arch="gpt2").ffn_hidden == 4 * 384
    assert dataclasses.replace(cfg, d_ff=100).ffn_hidden == 100


@pytest.mark.parametrize("tied", [True, False])
def test_build_model_takes_the_files_tensors_and_restores_init(tmp_path, tied):
    m = make(tie_embeddings=tied)
    save_model(m, str(tmp_path / "model.safetensors"))
    init = torch.nn.init.normal_
    loaded = build_model(tmp_path, m.cfg).eval()
    assert torch.nn.init.normal_ is init  # on_meta put torch's initialisers back
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    for (name, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(idx), loaded(idx))
    with torch.no_grad():  # the parameters are ordinary writable tensors
        loaded.tok_emb.weight.add_(1.0)
    assert torch.equal(build_model(tmp_path, m.cfg).tok_emb.weight, m.tok_emb.weight)
    save_model(m.to(torch.bfloat16), str(tmp_path / "model.safetensors"))  # a bf16 file: fp32 parameters
    assert {p.dtype for p in build_model(tmp_path, m.cfg).parameters()} == {torch.float32}


def test_loading_a_checkpoint_does_not_import_the_compiler(tmp_path):
    # ~1 s of every inference command's start-up: building on meta used to run torch.nn.init there
    m = make()
    save_model(m, str(tmp_path / "model.safetensors"))
    code = ("import sys, dataclasses; from llmgen.config import build_config; "
            "from llmgen.model.checkpoint import build_model; "
            f"cfg = dataclasses.replace(build_config({{'model': {{'preset': 'tiny'}}}}).model, vocab_size=97, max_seq_len=64); "
            f"build_model(__import__('pathlib').Path({str(tmp_path)!r}), cfg); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr

"""Each speed path in llmgen.kernels equals the plain network it replaces."""

import contextlib
import copy
import io
import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmgen.config import ModelConfig, build_config, load_config
from llmgen.data.sft import segment_mask
from llmgen.data.shards import WindowSampler
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.errors import LlmgenError
from llmgen.kernels import (blockwise, cpu_matmul, fp16_weights, fuse_projections, prepare_for_inference,
                            native, quantize_int8, training)
from llmgen.kernels.blockwise import BlockLinear, Split
from llmgen.kernels.cpu_matmul import DecodeLinear, linear
from llmgen.kernels.fp16_weights import Fp16Linear
from llmgen.kernels.int8 import Int8Linear
from llmgen.model.kv_cache import KVCache
from llmgen.model.transformer import MLP, Attention, RMSNorm, Transformer, apply_rope, attend, rope_tables, swiglu
from llmgen.model.transformer import gelu as transformer_gelu
from llmgen.train.loop import TrainJob, train
from llmgen.train.loss import linear_cross_entropy, softmax_grad_


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
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_model_matches_unfused(split, arch, monkeypatch):
    """fuse_projections (joined projections; column-major weights where the split product pays) changes
    speed, not logits, cached decoding or the state dict."""
    monkeypatch.setattr(cpu_matmul, "split_pays", lambda: split)
    torch.manual_seed(0)
    cfg = build_config({"model": {"preset": None, "arch": arch, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                  "d_model": 256, "max_seq_len": 64, "vocab_size": 1024}}).model
    plain = Transformer(cfg).eval()
    fused = copy.deepcopy(plain)
    keys = set(plain.state_dict())
    fuse_projections(fused)
    assert set(fused.state_dict()) == keys
    assert fused.blocks[0].attn.fused_qkv is not None and type(fused.blocks[0].mlp.w2) is DecodeLinear
    assert (fused.blocks[0].mlp.w2.weight.stride(0) == 1) == split  # column-major only for the split
    if cfg.tie_embeddings:
        assert fused.lm_head.weight is fused.tok_emb.weight
    idx = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        full = plain(idx)
        cache = KVCache.allocate(cfg, 1, 64)
        fused(idx[:, :8], cache=cache, pos=0)
        steps = [fused(idx[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(8, 12)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 8:], atol=1e-4, rtol=1e-4)


def test_split_pays_probe_keeps_thread_count():
    """The one-time BLAS probe restores the thread count, and with one thread there is nothing to split."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu_matmul.split_pays.cache_clear()
        assert cpu_matmul.split_pays() is False
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        cpu_matmul.split_pays.cache_clear()
        assert isinstance(cpu_matmul.split_pays(), bool)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
        cpu_matmul.split_pays.cache_clear()


def test_int8_weights_track_fp32(monkeypatch):
    """Weight-only int8 through torch's kernel (CPUs without AVX2, GPUs): each Linear computes
    x @ dequantised(W).T, the rounding error per weight is at most half a step, and the whole network's
    logits stay close to fp32 (but not identical)."""
    monkeypatch.setattr(blockwise, "missing", lambda: "this CPU's vector unit is DEFAULT")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    il = Int8Linear(lin)
    deq = il.weight_int8.float() * il.scales[:, None]
    assert (deq - lin.weight).abs().max() <= il.scales.max() / 2 + 1e-7
    x = torch.randn(3, 5, 64)
    assert torch.allclose(il(x), x @ deq.t() + lin.bias, atol=1e-4)
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                    vocab_size=260)).eval()
    q = quantize_int8(copy.deepcopy(model))
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    q2 = copy.deepcopy(model)
    assert prepare_for_inference(q2, "int8") == "int8 weights (torch's weight-only kernel)"
    assert type(q2.lm_head) is Int8Linear
    idx = torch.randint(0, 260, (2, 20))
    with torch.no_grad():
        a, b = model(idx), q(idx)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.05


def test_a_model_moved_to_another_dtype_is_fused_again():
    # two engines over one model (fp32, then bf16): the second must not run on the first's fused weights
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 97, "max_seq_len": 32}}).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (1, 8))
    fuse_projections(model)
    with torch.no_grad():
        ref = model(x)
    model.to(torch.bfloat16)
    fuse_projections(model)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max().item() < 0.1
    a = model.blocks[0].attn
    assert a.wq.weight.data_ptr() == a.fused_qkv.weight.data_ptr()


needs_fbgemm = pytest.mark.skipif(not fp16_weights.available(), reason="this torch build has no FBGEMM fp16 product")


def small_model(arch: str = "llama") -> Transformer:
    torch.manual_seed(0)
    return Transformer(build_config({"model": {"preset": None, "arch": arch, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                               "d_model": 128, "max_seq_len": 64, "vocab_size": 512}}).model).eval()


@needs_fbgemm
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp16_weights_are_fp32_math_on_rounded_weights(arch):
    """fp16 weights (FBGEMM): every projection computes x @ fp16(W).T + b in fp32, so the network's logits
    are the fp32 logits of the same model with its projection weights rounded to fp16; cached decoding
    agrees with the full pass; the state dict is unchanged."""
    plain = small_model(arch)
    rounded = copy.deepcopy(plain)
    with torch.no_grad():
        for m in rounded.modules():
            if type(m) is torch.nn.Linear:
                m.weight.copy_(m.weight.half().float())
    fast = copy.deepcopy(plain)
    keys = set(plain.state_dict())
    fuse_projections(fast, fp16=True)
    assert set(fast.state_dict()) == keys
    assert type(fast.lm_head) is Fp16Linear and fast.blocks[0].attn.fused_qkv.handle is not None
    if plain.cfg.tie_embeddings:
        assert fast.lm_head.weight is fast.tok_emb.weight
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full, want, ref = fast(idx), rounded(idx), plain(idx)
        cache = KVCache.allocate(plain.cfg, 2, 64)
        fast(idx[:, :8], cache=cache, pos=0)
        steps = torch.stack([fast(idx[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(8, 12)], 1)
    assert torch.allclose(full, want, atol=2e-4, rtol=1e-4)  # the rounded weights' fp32 logits
    assert (full - ref).abs().max() > 0  # not the fp32 weights: the test can tell them apart
    assert torch.allclose(steps, full[:, 8:], atol=2e-4, rtol=1e-4)


@needs_fbgemm
def test_weights_path_is_measured_or_as_asked(monkeypatch):
    """quantize auto picks fp16 weights only where the probe measured them clearly faster; none and fp16
    are obeyed; fp16 on a model that is not fp32 is refused in one line."""
    monkeypatch.setattr(fp16_weights, "decode_seconds", lambda bf16=False: {"fp32": 1.0, "fp16": 0.4, "bf16": 2.0})
    m = small_model()
    assert "fp16 weights (FBGEMM: decode matmul 2.5x" in prepare_for_inference(m, None)
    assert type(m.blocks[0].mlp.w2) is Fp16Linear
    monkeypatch.setattr(fp16_weights, "decode_seconds", lambda bf16=False: {"fp32": 1.0, "fp16": 0.9, "bf16": 2.0})
    m = small_model()
    assert prepare_for_inference(m, "auto").startswith("fp32 weights") and type(m.blocks[0].mlp.w2) is DecodeLinear
    m = small_model()
    kernels = "" if blockwise.missing() else "attention/RMSNorm kernels"
    assert (prepare_for_inference(m, "fp16") == ", ".join(filter(None, ["fp16 weights (FBGEMM), as asked", kernels]))
            and type(m.lm_head) is Fp16Linear)
    m = small_model()
    assert prepare_for_inference(m, "none") == kernels and type(m.lm_head) is DecodeLinear
    with pytest.raises(LlmgenError, match="fp16 is a CPU path for fp32 models.*bfloat16 on cpu: add --dtype fp32"):
        prepare_for_inference(small_model().to(torch.bfloat16), "fp16")


@needs_fbgemm
def test_fp16_prepared_model_moved_to_bf16_is_prepared_again():
    """An engine over a model prepared with fp16 weights, then moved to bf16: every swapped layer and fused
    projection is rebuilt for the new weights (none runs on the old fp32 snapshot)."""
    m = small_model()
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        ref = m(x)
    fuse_projections(m, fp16=True)
    m.to(torch.bfloat16)
    fuse_projections(m)
    assert type(m.lm_head) is DecodeLinear and m.blocks[0].attn.fused_qkv.handle is None
    with torch.no_grad():
        got = m(x)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max().item() < 0.1


@needs_fbgemm
def test_fp16_packs_are_freed_with_their_model():
    import gc

    def live() -> int:
        gc.collect()
        return sum(p is not None for p in fp16_weights._packed)

    before = live()
    m = fuse_projections(small_model(), fp16=True)
    assert live() == before + 2 * 4 + 1  # per block: q/k/v, o, gate/up, down; and the output head
    del m
    assert live() == before


@needs_fbgemm
def test_a_deep_copy_of_an_fp16_model_has_packs_of_its_own():
    """Copying a model prepared with fp16 weights gives it its own packed weights: it keeps working, with
    the same logits, after the original is gone (whose packs are freed with it)."""
    import gc

    m = fuse_projections(small_model(), fp16=True)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        want = m(x)
    twin = copy.deepcopy(m)
    assert twin.lm_head.handle != m.lm_head.handle
    assert twin.blocks[0].attn.fused_qkv.handle != m.blocks[0].attn.fused_qkv.handle
    del m
    gc.collect()
    with torch.no_grad():
        assert torch.equal(twin(x), want)
    fuse_projections(twin, fp16=True)  # preparing the copy again (its projections are no longer views of
    with torch.no_grad():  # one joined weight after the copy, so those are joined and packed anew)
        assert torch.equal(twin(x), want)


@needs_fbgemm
def test_perplexity_sized_batches_use_the_fp32_weights():
    """More than MAX_ROWS rows at once (a perplexity batch) multiply by the fp32 weights the layers keep:
    the logits are the plain model's, not the fp16-rounded ones that decoding-sized inputs get."""
    plain = small_model()
    fast = fuse_projections(copy.deepcopy(plain), fp16=True)
    big = torch.randint(0, 512, (20, 60))  # 1,200 rows
    assert big.numel() > fp16_weights.MAX_ROWS
    with torch.no_grad():
        want, got = plain(big), fast(big)
        small_got, small_want = fast(big[:2]), plain(big[:2])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (small_got - small_want).abs().max() > 10 * (got[:2] - want[:2]).abs().max()  # fp16 below it


needs_blockwise = pytest.mark.skipif(blockwise.missing() is not None, reason=f"{blockwise.missing()}")


def on_grid(out: int, inn: int) -> torch.Tensor:
    """A weight every block of which int4 represents exactly: codes 0..15 (both ends used) times an fp16
    scale plus an fp16 minimum."""
    codes = torch.randint(0, 16, (out, inn // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(out, inn // 32, 1) * 0.01 + 1e-3).half().float()
    m = (torch.randn(out, inn // 32, 1) * 0.05).half().float()
    return (codes * d + m).reshape(out, inn)


def rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """x with every block of 32 rounded to int8 as the kernels round activations (scale = max |x| / 127)."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks * torch.where(d > 0, 1 / d, 0)) * d).reshape(x.shape)


def test_blockwise_packs_round_trip():
    torch.manual_seed(0)
    w = on_grid(48, 128)
    assert torch.equal(blockwise.unpack(blockwise.pack(w, 4)), w)  # a Q4_1 model imported from GGUF: lossless
    w = torch.randn(40, 192)
    blocks = w.reshape(40, 6, 32)
    for bits, step in ((4, (blocks.amax(-1) - blocks.amin(-1)) / 15), (8, blocks.abs().amax(-1) / 127)):
        err = (blockwise.unpack(blockwise.pack(w, bits)) - w).abs().reshape(40, 6, 32).amax(-1)
        assert 0 < err.max() and (err <= step * 0.6).all()  # half a step, and the scale's rounding to fp16


@needs_blockwise
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,inn,out", [(1, 64, 8), (2, 576, 960), (7, 1536, 200), (63, 192, 33), (64, 192, 33),
                                          (79, 576, 96), (80, 576, 96), (150, 576, 96)])
def test_blockwise_products_are_exact_for_their_rounding(bits, rows, inn, out):
    """The kernels compute x @ (the packed weight).T, int4 with the activations rounded to int8 per block of
    32 (int8 takes them as they are): equal to that computed in fp32 by torch, up to the order of the
    sums, for row counts the int4 kernel takes 4, 2 and 1 at a time, on both sides of where the products
    go through BLAS on the widened weight (64 rows for int8, 80 for int4); and a bias is added."""
    blockwise.load()
    torch.manual_seed(rows + inn)
    w, x, b = torch.randn(out, inn) * 0.05, torch.randn(rows, inn), torch.randn(out)
    layer = BlockLinear(blockwise.pack(w, bits), b, bits, inn)
    with torch.no_grad():
        got = layer(x)
    want = (rounded_rows(x) if bits == 4 else x) @ blockwise.unpack(blockwise.pack(w, bits)).T + b
    assert got.shape == (rows, out)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    plain = x @ w.T + b
    assert 0 < ((got - plain).norm() / plain.norm()).item() < (0.1 if bits == 4 else 0.02)


@needs_blockwise
def test_quantize_blockwise_fuses_and_tracks_fp32():
    """int4 blocks with an int8 head: q/k/v and gate/up run as one product each, every projection is a
    BlockLinear (no fp32 projection left, the embedding stays), each layer alone agrees with its slice of
    the joined product, and the network's logits stay close to fp32."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                    vocab_size=260)).eval()
    q = copy.deepcopy(model)
    assert prepare_for_inference(q, "int4") == "int4 weights (blocks of 32, int8 head)"
    attn = q.blocks[0].attn
    assert isinstance(attn.fused_qkv, Split) and isinstance(q.blocks[0].mlp.fused_gate_up, Split)
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert q.lm_head.bits == 8 and attn.wq.bits == 4 and q.tok_emb.weight.dtype == torch.float32
    assert attn.wk.q.data_ptr() == attn.fused_qkv.whole.q.data_ptr() + attn.wq.q.numel()  # views, no copy
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        qq, kk, vv = attn.fused_qkv(x)
        assert torch.equal(kk, attn.wk(x)) and torch.equal(vv, attn.wv(x))
        idx = torch.randint(0, 260, (2, 20))
        a, b = model(idx), q(idx)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.1


def test_blockwise_says_why_it_cannot_run(monkeypatch):
    model = Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=64, max_seq_len=16, vocab_size=64))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "AVX2" in blockwise.missing()
    with pytest.raises(LlmgenError, match="int4/int8 on the CPU: this CPU's vector unit is DEFAULT"):
        prepare_for_inference(model, "int4")
    assert prepare_for_inference(model, "int8") == "int8 weights (torch's weight-only kernel)"
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "no C++ compiler" in blockwise.missing()
    with pytest.raises(LlmgenError, match="is bfloat16 on cpu"):
        prepare_for_inference(model.to(torch.bfloat16), "int4")


@needs_blockwise
@pytest.mark.parametrize("nh,nkv,slots", [(4, 2, 37), (9, 3, 256), (2, 2, 8)])
def test_decode_attention_equals_attend(nh, nkv, slots):
    """One new token per row over cache views (strided, as the scheduler passes them), with and without a
    mask that hides padding and future slots: the kernel gives transformer.attend's result; other shapes
    (prefill) go to attend itself."""
    blockwise.load()
    torch.manual_seed(slots)
    q = torch.randn(3, nh, 1, 64)
    k, v = (torch.randn(4, nkv, slots + 5, 64)[:3, :, :slots] for _ in range(2))
    mask = torch.rand(3, 1, 1, slots) > 0.3
    mask[:, ..., 0] = True
    for m in (mask, None):
        got = blockwise.decode_attend(q, k, v, m, 0.0)
        assert torch.allclose(got, attend(q, k, v, m, 0.0), atol=1e-5)
    q3 = torch.randn(3, nh, 4, 64)
    assert torch.equal(blockwise.decode_attend(q3, k, v, None, 0.0), attend(q3, k, v, None, 0.0))


@needs_blockwise
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 100), (2, 300, 128)])
def test_inference_rms_norm_equals_torchs(shape):
    """int4/int8 models normalise through llmgen_blockwise::rms_norm (one pass a row; torch's is several
    kernels): F.rms_norm's result to float rounding, decode rows and prefill-sized ones (the threaded
    path); a call that would need a backward, or another dtype, takes the module's plain path."""
    blockwise.load()
    torch.manual_seed(shape[1])
    x, w = torch.randn(*shape), torch.randn(shape[-1])
    want = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5)
    got = blockwise.rms_norm(x, w, 1e-5)
    assert got is not None and torch.allclose(got, want, atol=1e-5, rtol=1e-5) and not torch.equal(got, x)
    assert blockwise.rms_norm(x, torch.nn.Parameter(w), 1e-5) is None  # grad enabled: autograd's path
    assert blockwise.rms_norm(x.double(), w.double(), 1e-5) is None
    model = Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=64, max_seq_len=16, vocab_size=64))
    prepare_for_inference(model, "int4")
    assert {m.kernel for m in model.modules() if isinstance(m, RMSNorm)} == {blockwise.rms_norm}


@needs_blockwise
@pytest.mark.parametrize("quantize", ["none", "fp16"])
def test_fp32_decoding_uses_the_attention_and_norm_kernels(quantize):
    """Every fp32 CPU engine (not only int4/int8) decodes with the one-token attention and RMSNorm kernels
    (torch's are most of the eager step's overhead at small widths): the hooks are set, and the logits of
    a prefill and of decode steps over the cache match the plain model's; a bf16 model keeps torch's ops."""
    if quantize == "fp16" and not fp16_weights.available():
        pytest.skip("no FBGEMM fp16 product in this torch build")
    torch.manual_seed(0)
    plain_model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                          max_seq_len=64, vocab_size=260)).eval()
    fast = copy.deepcopy(plain_model)
    prepare_for_inference(fast, quantize)
    assert {m.kernel for m in fast.modules() if isinstance(m, RMSNorm)} == {blockwise.rms_norm}
    assert all(b.attn.attend is blockwise.decode_attend for b in fast.blocks)
    idx = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        want = plain_model(idx)
        cache = KVCache.allocate(fast.cfg, 2, 64)
        first = fast(idx[:, :8], cache=cache, pos=0)
        steps = torch.stack([fast(idx[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(8, 12)], 1)
    tol = dict(atol=2e-4, rtol=1e-4) if quantize == "none" else dict(atol=5e-2)  # fp16 weights round
    assert torch.allclose(first, want[:, :8], **tol) and torch.allclose(steps, want[:, 8:], **tol)
    bf16 = copy.deepcopy(plain_model).to(torch.bfloat16)
    prepare_for_inference(bf16, "none")
    assert all(m.kernel is None for m in bf16.modules() if isinstance(m, RMSNorm))


@needs_blockwise
def test_a_failed_kernel_build_says_why_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A build that fails (here: a compiler that always fails) is one LlmgenError, and leaves no half-built
    folder (or lock) for the next run to wait on; the next build in the same place succeeds."""
    monkeypatch.setenv("LLMGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    native.build.cache_clear()
    try:
        with pytest.raises(LlmgenError, match="could not build the CPU decoding kernels"):
            blockwise.load()
        assert not list((tmp_path / "kernels").iterdir())
        monkeypatch.delenv("CXX")  # a process of its own: this one has the library loaded from elsewhere
        subprocess.run([sys.executable, "-c", "from llmgen.kernels import blockwise; blockwise.load()"], check=True)
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [native.library_dir(blockwise.SOURCE).name]
    finally:
        native.build.cache_clear()


needs_training_kernels = pytest.mark.skipif(training.missing() is not None, reason=f"{training.missing()}")


def grads_of(fn, *xs, g=None):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    y = fn(*xs)
    y.backward(g)
    return y.detach(), [x.grad for x in xs]


@needs_training_kernels
@pytest.mark.parametrize("shape", [(12, 64, 128), (3, 5, 200), (1, 1, 12)])
def test_training_kernels_equal_torchs_ops(shape):
    """RMSNorm, RoPE, SwiGLU and GELU through the kernels give torch's forward and gradients (row lengths with
    and without a vector tail, a frozen norm weight, rotary tables per position and per row, extreme and
    NaN gate values); what they do not cover (bf16, a head size not a multiple of 16) runs torch's ops."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)
    x, w, g = torch.randn(*shape, requires_grad=True), torch.randn(shape[-1], requires_grad=True), torch.randn(*shape)
    want = grads_of(lambda x, w: F.rms_norm(x, (shape[-1],), w, 1e-5), x, w, g=g)
    got = grads_of(lambda x, w: training.rms_norm(x, w, 1e-5), x, w, g=g)
    for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    frozen = grads_of(lambda x, w: training.rms_norm(x, w, 1e-5), x, w.detach(), g=g)
    assert frozen[1][1] is None and torch.allclose(frozen[1][0], want[1][0], atol=1e-5, rtol=1e-4)

    a = torch.randn(*shape) * 8
    a.view(-1)[:3] = torch.tensor([-95.0, 95.0, 0.0])
    a.requires_grad_()
    u = torch.randn(*shape, requires_grad=True)
    want, got = (grads_of(f, a, u, g=g) for f in (swiglu, training.swiglu))
    for p, q in zip([want[0], *want[1]], [got[0], *got[1]]):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)
    nan = a.detach().clone()
    nan.view(-1)[0] = float("nan")
    assert training.swiglu(nan, u.detach()).view(-1)[0].isnan()
    want, got = (grads_of(f, a, g=g) for f in (transformer_gelu, training.gelu))
    assert torch.allclose(want[0], got[0], atol=1e-5, rtol=1e-4) and torch.allclose(want[1][0], got[1][0], atol=1e-5, rtol=1e-4)
    assert training.gelu(nan).view(-1)[0].isnan()

    cos, sin = rope_tables(32, 80, 10000.0)
    rows = torch.randint(0, 80, (3, 16))
    for tables in [(cos[4:20, None], sin[4:20, None]), (cos[rows].unsqueeze(2), sin[rows].unsqueeze(2))]:
        q, gq = torch.randn(3, 16, 4, 32, requires_grad=True), torch.randn(3, 16, 4, 32)
        want, got = (grads_of(lambda q: f(q, *tables), q, g=gq) for f in (apply_rope, training.rotate))
        assert torch.allclose(want[0], got[0], atol=1e-6) and torch.allclose(want[1][0], got[1][0], atol=1e-6)
        assert got[0].grad_fn is None  # grads_of detached it; the next line checks the kernel ran
        assert "RopeFn" in training.rotate(q, *tables).grad_fn.name()
    for f, ref, xs in [(training.swiglu, swiglu, (a, u)), (training.gelu, transformer_gelu, (a,)),
                       (lambda q: training.rotate(q, cos[:16, None], sin[:16, None]),
                        lambda q: apply_rope(q, cos[:16, None], sin[:16, None]), (torch.randn(3, 16, 4, 32),))]:
        # bf16 (what bf16 autocast's products give them): fp32 maths on the same bf16 values, rounded once,
        # at least as close to the fp32 result as torch's own bf16 ops
        half = [x.detach().bfloat16().requires_grad_() for x in xs]
        gh = torch.randn(half[0].shape).bfloat16()
        (y, grads), (yt, gt) = grads_of(f, *half, g=gh), grads_of(ref, *half, g=gh)
        (yr, gr) = grads_of(ref, *[x.float() for x in half], g=gh.float())
        assert y.dtype == torch.bfloat16 and "Fn>" in f(*half).grad_fn.name()
        assert (y.float() - yr).abs().max() <= (yt.float() - yr).abs().max() + 1e-2 * yr.abs().max()
        for k, t, r in zip(grads, gt, gr):
            assert k.dtype == torch.bfloat16
            assert (k.float() - r).abs().max() <= (t.float() - r).abs().max() + 1e-2 * r.abs().max()
    odd = torch.randn(3, 16, 4, 24, requires_grad=True)
    c24, s24 = rope_tables(24, 16, 10000.0)
    assert "RopeFn" not in training.rotate(odd, c24[:, None], s24[:, None]).grad_fn.name()
    assert training.rms_norm(x.detach().bfloat16(), w.detach().bfloat16(), 1e-5) is None


@needs_training_kernels
def test_attention_kernel_equals_torchs():
    """Causal attention through the kernel: torch's output and gradients (float64 reference) for head
    counts with and without grouped-query sharing, lengths off the kernel's 4-row and 8-key blocks, one
    token, head sizes 16-64 and q/k/v as the model's transposed views, the forward's P kept for the backward
    (short rows) and recomputed (long rows), finetuning's packed and padded rows (each query's keys a run
    ending at itself) both ways; bf16 at least as close to the exact result as torch's own
    bf16; where it does not apply (any other mask, dropout, a cache, a long context, an odd head size)
    torch's attention runs."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)

    def heads(B, T, H, D, dtype=torch.float32):  # (B, H, T, D) views of (B, T, H, D), as the model makes them
        return torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2).requires_grad_()

    for B, H, Hk, T, D in [(2, 4, 4, 64, 32), (1, 4, 2, 7, 32), (3, 6, 6, 37, 64), (2, 4, 1, 130, 16), (1, 2, 2, 1, 32),
                           (1, 2, 1, 300, 16)]:
        q, k, v, g = heads(B, T, H, D), heads(B, T, Hk, D), heads(B, T, Hk, D), torch.randn(B, H, T, D)
        y, grads = grads_of(lambda q, k, v: training.attend(q, k, v, None, 0.0), q, k, v, g=g)
        want, wgrads = grads_of(lambda q, k, v: attend(q, k, v, None, 0.0), *(t.double() for t in (q, k, v)), g=g.double())
        assert "AttentionFn" in training.attend(q, k, v, None, 0.0).grad_fn.name()
        for a, b in zip([y, *grads], [want, *wgrads]):
            assert a.dtype == torch.float32 and torch.allclose(a.double(), b, atol=1e-5)
        with torch.inference_mode():  # no autograd key: the same kernel, forward only
            assert torch.equal(training.attend(q, k, v, None, 0.0), y)
    half = [heads(2, 50, h, 32, torch.bfloat16) for h in (4, 2, 2)]
    gh = torch.randn(2, 4, 50, 32).bfloat16()
    (y, grads), (yt, gt) = (grads_of(lambda q, k, v: f(q, k, v, None, 0.0), *half, g=gh) for f in (training.attend, attend))
    yr, gr = grads_of(lambda q, k, v: attend(q, k, v, None, 0.0), *(t.double() for t in half), g=gh.double())
    assert y.dtype == torch.bfloat16 and "AttentionFn" in training.attend(*half, None, 0.0).grad_fn.name()
    for a, t, r in zip([y, *grads], [yt, *gt], [yr, *gr]):
        assert (a.double() - r).abs().max() <= (t.double() - r).abs().max() + 1e-2 * r.abs().max()
    # finetuning rows: examples packed one after another and padding, each token seeing its own example's keys
    for seg in ([[0] * 20 + [1] * 30 + [2] * 9 + [-1] * 5, [0] * 61 + [-1] * 3],
                [[0] * 100 + [1] * 150 + [2] * 40 + [-1] * 10]):
        packed = segment_mask(torch.tensor(seg))
        B, T = packed.shape[0], packed.shape[-1]
        D = 64 if T == 64 else 32  # P kept (T H <= (H + Hk) D), then recomputed
        q, k, v, g = heads(B, T, 4, D), heads(B, T, 2, D), heads(B, T, 2, D), torch.randn(B, 4, T, D)
        y, grads = grads_of(lambda q, k, v: training.attend(q, k, v, packed, 0.0), q, k, v, g=g)
        want, wgrads = grads_of(lambda q, k, v: attend(q, k, v, packed, 0.0), *(t.double() for t in (q, k, v)), g=g.double())
        assert "AttentionFn" in training.attend(q, k, v, packed, 0.0).grad_fn.name()
        edge = seg[0].count(0)  # the second example's first token
        assert torch.equal(training.first_keys(packed)[0, edge - 2:edge + 3], torch.tensor([0, 0] + [edge] * 3))
        for a, b in zip([y, *grads], [want, *wgrads]):
            assert torch.allclose(a.double(), b, atol=1e-5)
    q, k, v = heads(1, 8, 2, 32), heads(1, 8, 2, 32), heads(1, 8, 2, 32)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    mask[0, 0, 5, 2] = False  # a hole: not a run of keys
    cached = heads(1, 12, 2, 32)
    for args in [(q, k, v, mask, 0.0), (q, k, v, None, 0.1), (q, cached, cached, None, 0.0),
                 (heads(1, 600, 1, 16),) * 3 + (None, 0.0), (heads(1, 8, 2, 24),) * 3 + (None, 0.0)]:
        assert "AttentionFn" not in training.attend(*args).grad_fn.name()
    assert torch.equal(training.attend(q, cached, cached, None, 0.0), attend(q, cached, cached, None, 0.0))


@needs_training_kernels
def test_rope_inside_the_attention_kernel_equals_rotating_first():
    """attend_rope (q and k rotated as the kernel reads them, their gradients leaving through the inverse
    rotation) gives apply_rope-then-attention's output and gradients (float64 reference), with the tables as the
    model slices them (positions 0.. as (T, 1, hs), or each row's own positions as (B, T, 1, hs)), grouped-query
    heads, P kept (short rows) and recomputed (long rows), packed rows both ways; bf16 as close as torch's own bf16; None where
    the kernel does not apply, and a model with the hook set gives the same logits as without."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)

    def heads(B, T, H, D, dtype=torch.float32):
        return torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2).requires_grad_()

    def rotated_then_attend(rope, mask):
        def f(q, k, v):
            r = tuple(t.to(q.dtype) for t in rope)
            q, k = (apply_rope(t.transpose(1, 2), *r).transpose(1, 2) for t in (q, k))
            return attend(q, k, v, mask, 0.0)
        return f

    packed = segment_mask(torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 61 + [-1] * 3]))
    for B, H, Hk, T, D, per_row, mask in [(2, 4, 2, 64, 32, False, None), (2, 4, 4, 37, 64, True, None),
                                          (1, 2, 1, 300, 16, False, None), (2, 4, 2, 64, 32, True, packed),
                                          (2, 4, 2, 64, 64, False, packed)]:
        c, s = rope_tables(D, 512, 10000.0)
        pos = torch.randint(0, 400, (B, T))
        rope = (c[pos].unsqueeze(2), s[pos].unsqueeze(2)) if per_row else (c[:T, None], s[:T, None])
        q, k, v, g = heads(B, T, H, D), heads(B, T, Hk, D), heads(B, T, Hk, D), torch.randn(B, H, T, D)
        y, grads = grads_of(lambda q, k, v: training.attend_rope(q, k, v, rope, mask, 0.0), q, k, v, g=g)
        want, wgrads = grads_of(rotated_then_attend(tuple(t.double() for t in rope), mask),
                                *(t.double() for t in (q, k, v)), g=g.double())
        assert "AttentionFn" in training.attend_rope(q, k, v, rope, mask, 0.0).grad_fn.name()
        for a, b in zip([y, *grads], [want, *wgrads]):
            assert a.dtype == torch.float32 and torch.allclose(a.double(), b, atol=1e-5)
    half = [heads(2, 50, h, 32, torch.bfloat16) for h in (4, 2, 2)]
    cos, sin = rope_tables(32, 64, 10000.0)
    gh, rope = torch.randn(2, 4, 50, 32).bfloat16(), (cos[:50, None], sin[:50, None])
    y, grads = grads_of(lambda q, k, v: training.attend_rope(q, k, v, rope, None, 0.0), *half, g=gh)
    yt, gt = grads_of(rotated_then_attend(rope, None), *half, g=gh)
    yr, gr = grads_of(rotated_then_attend(tuple(t.double() for t in rope), None), *(t.double() for t in half), g=gh.double())
    assert y.dtype == torch.bfloat16
    for a, t, r in zip([y, *grads], [yt, *gt], [yr, *gr]):
        assert (a.double() - r).abs().max() <= (t.double() - r).abs().max() + 1e-2 * r.abs().max()
    q = heads(1, 8, 2, 32)
    assert training.attend_rope(q, q, q, (cos[:8, None], sin[:8, None]), None, 0.1) is None  # dropout
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                    vocab_size=260))
    idx = torch.randint(0, 260, (2, 40))
    plain = model(idx)
    training.enable(model)
    assert all(a.attend_rope is training.attend_rope for a in model.modules() if isinstance(a, Attention))
    assert torch.allclose(model(idx), plain, atol=1e-5)


@needs_training_kernels
def test_joined_projections_equal_separate_linears():
    """q/k/v and gate/up as one joined product (`JoinedLinears`, `linears_train`): the separate linears' outputs
    and gradients (float64 reference), written side by side into one tensor; the attention and SwiGLU kernels
    give their gradients back as the blocks of one tensor, which the backward takes without a copy, and any other
    gradients (separate tensors, one unused) are joined; a frozen weight gets none; a model trains to the plain
    path's losses; no grad, a LoRA wrapper or a bias runs the modules one by one; bf16 autocast runs it in bf16."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)
    attn = Attention(ModelConfig(preset=None, n_layer=1, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                 vocab_size=10), 0)
    joined = training.JoinedLinears(attn, ("wq", "wk", "wv"))
    x = torch.randn(3, 20, 64, requires_grad=True)
    q, k, v = joined(x)
    assert q.shape == (3, 20, 64) and k.shape == v.shape == (3, 20, 32)
    assert k.data_ptr() == q.data_ptr() + 64 * 4 and v.data_ptr() == k.data_ptr() + 32 * 4 and q.stride(1) == 128
    mods = (attn.wq, attn.wk, attn.wv)
    ref = [F.linear(x.double(), m.weight.double()) for m in mods]
    assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip((q, k, v), ref))

    def grads(outs, gs, inputs):
        return torch.autograd.grad(outs, inputs, gs, allow_unused=True, retain_graph=True)

    inputs = (x, *(m.weight for m in mods))
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = [F.linear(ref_in[0], w) for w in ref_in[1:]]
    gs = [torch.randn_like(t) for t in (q, k, v)]
    want = grads(ref_out, [g.double() for g in gs], ref_in)
    # separate gradients (joined by the backward), then one tensor's blocks (taken whole)
    whole = torch.randn(3, 20, 128)
    for given in (gs, list(whole.split([64, 32, 32], -1))):
        q, k, v = joined(x)
        got = grads((q, k, v), given, inputs)
        exact = grads(ref_out, [g.double() for g in given], ref_in) if given is not gs else want
        assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(got, exact))
    q, k, v = joined(x)  # k unused: its gradient is zero
    got = grads((q, v), (gs[0], gs[2]), inputs)
    exact = grads((ref_out[0], ref_out[2]), (gs[0].double(), gs[2].double()), ref_in)
    assert exact[2] is None and not got[2].any()
    assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(got, exact) if b is not None)
    attn.wk.weight.requires_grad_(False)  # frozen: no gradient for it, the rest as before
    q, k, v = joined(x)
    q.backward(gs[0], retain_graph=True)
    assert attn.wk.weight.grad is None and attn.wq.weight.grad is not None
    attn.wk.weight.requires_grad_(True)
    attn.wq.weight.grad = None

    # through the attention kernel: its q/k/v gradients are the blocks of one tensor
    q, k, v = (t.view(3, 20, -1, 16).transpose(1, 2) for t in joined(x))
    dq, dk, dv = torch.autograd.grad(training.attend(q, k, v, None, 0.0), (q, k, v), torch.randn(3, 4, 20, 16))
    assert dk.data_ptr() == dq.data_ptr() + 64 * 4 and dv.data_ptr() == dk.data_ptr() + 32 * 4 and dq.stride(2) == 128
    # SwiGLU's gate and up as the halves of the joined product: their gradients too, and the kernel's results
    mlp = MLP(ModelConfig(preset=None, n_layer=1, n_head=4, d_model=64, max_seq_len=64, vocab_size=10))
    gate, up = training.JoinedLinears(mlp, ("w1", "w3"))(x)
    assert up.data_ptr() == gate.data_ptr() + gate.shape[-1] * 4
    g = torch.randn_like(gate)
    h = training.swiglu(gate, up)
    assert "SwiGLUFn" in h.grad_fn.name() and torch.allclose(h, swiglu(gate, up), atol=1e-6)
    da, du = torch.autograd.grad(h, (gate, up), g, retain_graph=True)
    assert du.data_ptr() == da.data_ptr() + gate.shape[-1] * 4
    want = torch.autograd.grad(swiglu(gate, up), (gate, up), g)
    assert torch.allclose(da, want[0], atol=1e-5) and torch.allclose(du, want[1], atol=1e-5)

    # a model with the joined products trains to the plain kernels' losses and gradients
    cfg = ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, vocab_size=50)
    models = [Transformer(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        training.enable(m)
    for mod in models[1].modules():
        if isinstance(mod, (Attention, MLP)):
            mod.fused_qkv = mod.fused_gate_up = None
    idx = torch.randint(0, 50, (2, 24))
    losses, grad_sets = [], []
    for m in models:
        loss = F.cross_entropy(m(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        losses.append(loss.item())
        grad_sets.append([p.grad for p in m.parameters()])
    assert isinstance(models[0].blocks[0].attn.fused_qkv, training.JoinedLinears)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grad_sets))
    with torch.no_grad():  # prepared for decoding afterwards: the decoding path's joined projections take over
        want = models[1](idx)
        fuse_projections(models[0])
        assert not isinstance(models[0].blocks[0].attn.fused_qkv, training.JoinedLinears)
        assert torch.allclose(models[0](idx), want, atol=1e-4)

    # where it does not apply: the modules one by one
    with torch.no_grad():
        assert q.grad_fn is not None and joined(x)[0].stride(1) == 64
    attn.wk = torch.nn.Sequential(attn.wk)  # a wrapper in the module's place (as LoRA puts one)
    assert joined(x)[0].stride(1) == 64 and torch.allclose(joined(x)[1], ref[1].float(), atol=1e-5)
    attn.wk = attn.wk[0]
    biased = Attention(ModelConfig(preset=None, n_layer=1, n_head=4, d_model=64, max_seq_len=64, vocab_size=10,
                                   qkv_bias=True), 0)
    assert training.JoinedLinears(biased, ("wq", "wk", "wv"))(x)[0].stride(1) == 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = joined(x)
        plain = attn.wq(x)
    assert q.dtype == torch.bfloat16 and q.stride(1) == 128 and torch.equal(q, plain)
    q.float().sum().backward()
    assert x.grad is not None and attn.wq.weight.grad.dtype == torch.float32


@needs_training_kernels
def test_grad_norm_kernel_equals_float64():
    """The gradients' global norm for clipping (`training.grad_norm`, on every thread) is the float64 norm to fp32
    rounding, over tensors longer and shorter than its 64K-float pieces and off its 32-float steps; anything but
    contiguous fp32 is left to torch (None)."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)
    grads = [torch.randn(300, 700) * 3, torch.randn(37), torch.randn(65536 + 33), torch.randn(1) * 1e3]
    exact = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert training.grad_norm(grads).dtype == torch.float32
    assert training.grad_norm(grads).double().item() == pytest.approx(exact.item(), rel=1e-6)
    assert training.grad_norm(grads[1:2]).item() == pytest.approx(grads[1].double().norm().item(), rel=1e-6)
    assert training.grad_norm([grads[0].t()]) is None and training.grad_norm([grads[1].double()]) is None


@needs_training_kernels
def test_adamw_kernel_steps_as_torchs_fused_adamw():
    """optim.AdamW's CPU step through the kernel (training.adamw_step) follows torch's fused AdamW to fp32
    rounding over several steps: two groups (with and without weight decay), a clip factor in grad_scale on some
    steps, a parameter without a gradient left alone, sizes off the vector width; the state is torch's (one
    optimizer's state_dict loads into the other and both go on alike); a bf16 parameter takes torch's step."""
    native.build(training.SOURCE, training.WHAT, 25)
    from llmgen.train.optim import AdamW

    torch.manual_seed(0)
    shapes = [(64, 33), (37,), (3, 5, 7), (70000,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    o_ours = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert "AdamW" in training.enable(Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=32, max_seq_len=8,
                                                              vocab_size=16)), None, o_ours)
    assert o_ours.cpu_kernels and not AdamW(groups(ref), fused=True).cpu_kernels  # set by enable, not before
    o_ref = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for i in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours[2].grad = ref[2].grad = None if i == 3 else ours[2].grad
        o_ours.grad_scale = o_ref.grad_scale = torch.tensor(2.5) if i % 2 else None
        assert training.adamw_step(o_ours)  # the kernel ran (the optimizer's step calls the same)
        o_ref.step()
        o_ours.grad_scale = o_ref.grad_scale = None
        for p, q in zip(ours, ref):
            assert torch.allclose(p, q, atol=2e-6, rtol=1e-5)
    assert o_ours.state[ours[2]]["step"].item() == 5 and o_ours.state[ours[0]]["step"].dtype == torch.float32
    for a, b in zip(o_ours.state.values(), o_ref.state.values()):
        assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-6) and torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-7)
    o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))  # torch's state goes on through the kernel
    for p, q in zip(ours, ref):
        p.data.copy_(q.data)
        p.grad = q.grad = torch.ones(p.shape)
    o_ours.step(), o_ref.step()
    assert all(torch.allclose(p, q, atol=2e-6, rtol=1e-5) for p, q in zip(ours, ref))
    half = torch.randn(8, requires_grad=True, dtype=torch.bfloat16)
    half.grad = torch.ones(8, dtype=torch.bfloat16)
    mixed = AdamW([half], lr=1e-2, fused=True)
    assert not training.adamw_step(mixed)
    before = half.detach().clone()
    mixed.step()  # torch's own step
    assert not torch.equal(half.detach(), before)


@needs_training_kernels
def test_cross_entropy_kernel_equals_torchs():
    """The loss's softmax kernel: the same weighted loss sum and gradient rows as torch's ops (softmax_grad_)
    and, through the chunked loss, as F.cross_entropy, for vocabularies on and off its 8-lane vectors,
    extreme logits, ignored targets; a target outside the vocabulary is an error, not a read past the row."""
    native.build(training.SOURCE, training.WHAT, 25)
    torch.manual_seed(0)
    for V in (11, 64, 4099):
        x = torch.randn(37, V) * 5
        x[0, 3], x[1, 0] = 80.0, -90.0
        t, w = torch.randint(0, V, (37,)), torch.rand(37)
        w[5] = 0.0
        a, b = x.clone(), x.clone()
        want, got = softmax_grad_(a, t, w), training.cross_entropy_grad(b, t, w)
        assert got is not None and abs(got.item() - want.item()) <= 1e-5 * want.item()
        assert torch.allclose(a, b, atol=1e-6) and b[5].abs().max() == 0
    h, wt = torch.randn(300, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100
    for kernel in (training.cross_entropy_grad, None):
        loss = linear_cross_entropy(h, wt, t, kernel)
        loss.backward()
        ref_h, ref_w = h.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
        ref = F.cross_entropy(ref_h @ ref_w.t(), t, ignore_index=-100)
        ref.backward()
        assert torch.allclose(loss, ref, atol=1e-6)
        assert torch.allclose(h.grad, ref_h.grad, atol=1e-6) and torch.allclose(wt.grad, ref_w.grad, atol=1e-6)
        h.grad = wt.grad = None
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        training.cross_entropy_grad(torch.randn(4, 11), torch.tensor([0, 1, 11, 2]), torch.ones(4))
    assert training.cross_entropy_grad(torch.randn(4, 11).double(), torch.zeros(4, dtype=torch.long), torch.ones(4)) is None


@needs_training_kernels
def test_training_with_the_kernels_follows_torchs_ops(tmp_path):
    """The same 8 steps with and without `train.kernels`: the start line says which ran, and the losses
    agree to float rounding."""
    text = ("the quick brown fox jumps over the lazy dog. " * 400).encode()
    tokens = torch.tensor(list(text)).numpy()
    bytes_tokenizer().save(tmp_path / "tok")
    losses, lines = {}, {}
    for on in (True, False):
        run = tmp_path / f"run-{on}"
        cfg = load_config(None, [f"run_dir={run}", f"train.kernels={str(on).lower()}", "train.max_steps=8",
                                 "train.batch_size=4", "train.seq_len=32", "train.lr=1e-2", "train.warmup_steps=2",
                                 "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
                                 "train.mixed_precision=fp32"])  # the same arithmetic on every CPU kind
        torch.manual_seed(0)
        model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                        vocab_size=260))
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            train(cfg, model, TrainJob("pretrain", WindowSampler(tokens, 4, 32, 0), {}, tmp_path / "tok"))
        lines[on] = said.getvalue()
        losses[on] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(x)]
        assert all(m.kernel is (training.rms_norm if on else None) for m in model.modules() if isinstance(m, RMSNorm))
    assert "fused RMSNorm/RoPE/attention/SwiGLU/cross-entropy/AdamW kernels" in lines[True] and "kernels" not in lines[False]
    gpt2 = Transformer(ModelConfig(preset=None, arch="gpt2", n_layer=1, n_head=2, d_model=64, max_seq_len=16,
                                   vocab_size=64))
    assert training.enable(gpt2) == "fused attention/GELU kernels"
    assert len(losses[True]) == 8 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_training_kernels_say_why_they_do_not_run(monkeypatch):
    """No AVX2 (or a failed build): the model keeps torch's ops and the start line says why."""
    llama = Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=64, max_seq_len=16, vocab_size=64))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "vector unit is DEFAULT" in training.enable(llama)
    assert all(m.kernel is None for m in llama.modules() if isinstance(m, RMSNorm))
    monkeypatch.undo()

    def broken(*a):
        raise LlmgenError("could not build the kernels in /x: compiler said no")

    monkeypatch.setattr(native, "build", broken)
    if training.missing() is None:
        assert training.enable(llama) == "torch's elementwise ops (could not build the kernels in /x: compiler said no)"
    assert all(m.rotate is apply_rope and m.attend is attend for m in llama.modules() if isinstance(m, Attention))


@needs_training_kernels
def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """The kernels' cache under a path that cannot be a folder: a clear reason, and training goes on."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LLMGEN_CACHE_DIR", str(tmp_path / "file"))
    native.build.cache_clear()
    try:
        with pytest.raises(LlmgenError, match="cannot write .*set LLMGEN_CACHE_DIR to a writable folder"):
            native.build(training.SOURCE, training.WHAT, 25)
        llama = Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=64, max_seq_len=16, vocab_size=64))
        assert "set LLMGEN_CACHE_DIR" in training.enable(llama)
    finally:
        native.build.cache_clear()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_for_the_next_step():
    """A step's worth of megabyte blocks and one of 100 MB (a SmolLM2-sized gradient), freed and made again:
    glibc maps them fresh each time by default (thousands of page faults a step); after keep_freed_memory the
    next step reuses them."""
    code = """if True:
        import resource, sys, torch
        from llmgen.kernels import training
        if sys.argv[1] == "on":
            assert training.keep_freed_memory()
        def step():
            blocks = [torch.ones(300_000 + 1000 * i) for i in range(12)]  # activations, alive together
            blocks.append(torch.ones(25_000_000))  # 100 MB: past what glibc keeps without being told
            del blocks
        step(), step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)"""
    faults = {on: float(subprocess.run([sys.executable, "-c", code, on], capture_output=True, text=True,
                                       check=True).stdout) for on in ("on", "off")}
    if faults["off"] < 100:
        pytest.skip(f"this glibc keeps freed blocks by itself ({faults['off']} faults a step)")
    assert faults["on"] < faults["off"] / 20

"""GGUF export: the file transformers' GGUF reader loads back gives the source model's logits and
tokens; q8_0 stays within 1 % perplexity; the Modelfile carries the template, stops and persona."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from llmgen.config import ModelConfig, load_persona
from llmgen.data.tokenizer import Tokenizer, bytes_tokenizer, train_bpe
from llmgen.interop.gguf_export import _interleave_rope, export_gguf, gguf_vocab
from llmgen.interop.hf import import_model
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. Numbers 12345 and émigrés!  Twice  spaced.\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMGEN_CACHE", str(tmp_path / "cache"))


def spm_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE as Llama 2's tokenizer.json has it: <unk> <s> </s>, 256 byte-fallback
    tokens, "▁" for spaces (normalizer), merges learnt on TEXT."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    escape = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    learner = HFTokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = escape
    learner.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    learner.train_from_iterator([TEXT * 20], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                                  show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    spm = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.normalizer = escape
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(spm, None, "</s>", None, "pretrained", {"bos_token": "<s>", "unk_token": "<unk>"})


def _checkpoint(tmp_path: Path, tokenizer: str = "bytes", head_scale: float = 1.0, **shape) -> Path:
    tok = {"bytes": bytes_tokenizer, "spm": spm_tokenizer}.get(tokenizer, lambda: train_bpe([TEXT * 20, "hello world " * 50], 300))()
    torch.manual_seed(0)
    cfg = ModelConfig(preset=None, n_layer=2, n_head=4, d_model=64, max_seq_len=128, vocab_size=tok.vocab_size + 4,
                      **shape)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(head_scale)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    folder = tmp_path / f"ckpt-{cfg.arch}"
    save_checkpoint(folder, model, tok_dir, {"step": 0})
    return folder


def _logits(folder, text=TEXT):
    lm = load_model(str(folder))
    ids = torch.tensor([lm.tokenizer.encode(text)])
    with torch.no_grad():
        return lm.model.eval()(ids)[0], ids[0]


@pytest.mark.parametrize("tokenizer,shape", [
    ("bpe", dict(arch="llama", n_kv_head=2, tie_embeddings=False)),
    ("bytes", dict(arch="llama", tie_embeddings=True)),
    ("bpe", dict(arch="llama", qkv_bias=True, n_kv_head=2)),
    ("bpe", dict(arch="gpt2", tie_embeddings=True)),
    ("bytes", dict(arch="gpt2", tie_embeddings=False)),
    ("spm", dict(arch="llama", n_kv_head=2, tie_embeddings=False)),
], ids=["llama-bpe-gqa-untied", "llama-bytes-tied", "qwen2-bias", "gpt2-bpe-tied", "gpt2-bytes-untied", "llama-spm"])
def test_f32_export_round_trips_through_transformers_gguf_reader(tmp_path, tokenizer, shape):
    folder = _checkpoint(tmp_path, tokenizer, **shape)
    path, modelfile = export_gguf(str(folder), tmp_path / "out" / "model.gguf", "f32")
    back = import_model(str(path), tmp_path / "back")
    a, ids = _logits(folder)
    b, ids_back = _logits(back)
    assert torch.equal(ids, ids_back)  # the tokenizer survives: same ids for the same text
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-4
    src, got = load_model(str(folder)), load_model(str(back))
    assert got.model.cfg.tie_embeddings == src.model.cfg.tie_embeddings
    assert got.tokenizer.eos_token == src.tokenizer.eos_token
    assert modelfile.read_text().startswith("# made by") and "FROM ./model.gguf" in modelfile.read_text()


def test_q8_0_keeps_perplexity_within_one_percent_and_f16_bf16_load(tmp_path):
    folder = _checkpoint(tmp_path, "bytes", head_scale=8.0, arch="llama", n_kv_head=2)  # peaked predictions
    ref, ids = _logits(folder)

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())

    for outtype, tol in (("q8_0", 0.01), ("f16", 0.002), ("bf16", 0.01)):
        path, _ = export_gguf(str(folder), tmp_path / outtype / "m.gguf", outtype)
        got, _ = _logits(import_model(str(path), tmp_path / f"back-{outtype}"))
        assert abs(ppl(got) / ppl(ref) - 1) <= tol, outtype
        assert (got - ref).abs().max().item() < 0.5, outtype  # close, but not bit-equal: it is quantized
        assert (got - ref).abs().max().item() > 0, outtype
    sizes = {t: (tmp_path / t / "m.gguf").stat().st_size for t in ("q8_0", "f16")}
    assert sizes["q8_0"] < sizes["f16"]


def test_rope_rows_are_interleaved_per_head():
    w = torch.arange(8).float().unsqueeze(1).repeat(1, 3)  # 2 heads of 4 rows: halves (0,1 | 2,3)
    assert _interleave_rope(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_vocab_names_the_pre_tokenizer_or_refuses(tmp_path):
    from tokenizers import pre_tokenizers

    bpe = train_bpe([TEXT * 20], 300)
    assert gguf_vocab(bpe, bpe.vocab_size).pre == "gpt-2"
    v = gguf_vocab(bpe, bpe.vocab_size + 3)
    assert v.tokens[-1].startswith("[PAD") and v.types[-1] == 5 and v.types[bpe.eot_id] == 3
    bpe.tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert gguf_vocab(bpe, bpe.vocab_size).pre == "smollm"
    bpe.tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(Exception, match="none of those llama.cpp implements"):
        gguf_vocab(bpe, bpe.vocab_size)


def test_cli_export_gguf_modelfile_persona_and_refusals(tmp_path, cli):
    folder = _checkpoint(tmp_path, "bpe", arch="llama")
    out = tmp_path / "x" / "m.gguf"
    persona = REPO / "configs" / "personas" / "support.yaml"
    code, _, err = cli("export", str(folder), "--format", "gguf", "--output", str(out), "--persona", str(persona))
    assert code == 0 and "f16 weights (the default" in err
    text = (out.parent / "Modelfile").read_text()
    assert '<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{load_persona(persona).system}"""' in text and "PARAMETER temperature 0.3" in text
    before = out.read_bytes()
    code, _, err = cli("export", str(folder), "--format", "gguf", "--output", str(out), "--outtype", "q8_0")
    assert code == 2 and "exists; pass --overwrite" in err and out.read_bytes() == before
    code, _, err = cli("export", str(folder), "--format", "gguf", "--output", str(out), "--outtype", "q4")
    assert code == 2 and "--outtype 'q4' is not supported" in err
    code, _, err = cli("export", str(folder), "--output", str(tmp_path / "hf"), "--outtype", "q8_0")
    assert code == 2 and "--outtype goes with --format gguf" in err
    code, _, _ = cli("export", str(folder), "--format", "gguf", "--output", str(out), "--outtype", "q8_0", "--overwrite")
    assert code == 0 and out.read_bytes() != before and not list(out.parent.glob(".*tmp*"))

"""Import/export: logits parity with transformers for both architectures, lossless round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmgen.config import EngineOptions, GenerateConfig, ModelConfig
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.generate.engine import Engine
from llmgen.interop.export import export_hf
from llmgen.interop.hf import import_model
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMGEN_CACHE", str(tmp_path / "cache"))


def _checkpoint(tmp_path: Path, **shape) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(preset=None, n_layer=2, n_head=4, d_model=64, max_seq_len=64, vocab_size=260, **shape)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    tok_dir = tmp_path / "tok"
    bytes_tokenizer().save(tok_dir)
    folder = tmp_path / f"ckpt-{cfg.arch}"
    save_checkpoint(folder, model, tok_dir, {"step": 0})
    return folder


def _ids():
    return torch.tensor([list(b"Hello, world! This is a parity test.")])


@pytest.mark.parametrize("shape", [dict(arch="llama", n_kv_head=2, tie_embeddings=False),
                                   dict(arch="llama", qkv_bias=True, n_kv_head=2),
                                   dict(arch="gpt2")], ids=["llama-gqa-untied", "qwen2-bias", "gpt2"])
def test_export_matches_transformers_and_round_trips(tmp_path, shape):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _checkpoint(tmp_path, **shape)
    ours = load_model(str(folder)).model.eval()
    out = export_hf(str(folder), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected_cls = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[shape["arch"]]
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if shape.get("qkv_bias") else expected_cls)
    with torch.no_grad():
        a = ours(_ids())[0]
        b = hf(_ids()).logits
    assert (a - b).abs().max().item() < 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("Héllo")["input_ids"]) == "Héllo" and tok.chat_template

    back = import_model(str(out), tmp_path / "back")  # HF -> llmgen is lossless
    again = load_model(str(back)).model
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_gpt2_built_with_transformers_imports_with_parity(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_positions=64, n_embd=48, n_layer=2, n_head=4)).eval()
    src = tmp_path / "gpt2-small"
    hf.save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_object=bytes_tokenizer().tok, eos_token="<|endoftext|>").save_pretrained(src)
    folder = import_model(str(src))
    ours = load_model(str(folder)).model
    with torch.no_grad():
        assert (ours(_ids())[0] - hf(_ids()).logits).abs().max().item() < 1e-4
    assert import_model(str(src)) == folder  # cached: the second import is instant


def test_import_refuses_unsupported_and_export_refuses_nonempty(tmp_path, cli):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = cli("import", bert, "--output", tmp_path / "x")
    assert code == 2 and "'bert'" in err and "llama" in err
    folder = _checkpoint(tmp_path, arch="llama")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = cli("export", folder, "--output", target)
    assert code == 2 and "--overwrite" in err and (target / "keep.txt").read_text() == "mine"
    code, _, err = cli("import", str(tmp_path / "missing.gguf"))
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_smollm2_gguf_parity_and_greedy_generate(tmp_path):
    """SmolLM2-135M-Instruct from the GGUF: same logits and same greedy tokens as transformers."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.environ.get("LLMGEN_SMOLLM2_GGUF")
    if not gguf:
        try:
            gguf = subprocess.run(["bash", "scripts/fetch_smollm2.sh"], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parents[1]).stdout.strip().splitlines()[-1]
        except (subprocess.CalledProcessError, IndexError):
            pytest.skip("SmolLM2 GGUF not available (no package registry)")
    folder = import_model(gguf)
    lm = load_model(str(folder))
    gguf_path = Path(gguf)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        diff = (lm.model(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff < 1e-3
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eng = Engine(lm.model, lm.tokenizer, options=EngineOptions(device="cpu"))
    assert eng.prompt_ids(msgs, GenerateConfig()) == ids[0].tolist()  # our chat rendering = transformers'
    p = GenerateConfig(max_new_tokens=32, temperature=0.0)
    got = eng.generate([msgs], p)[0][0]  # the same ids (checked above), stopping at <|im_end|> = EOS
    n = len(got.tokens)
    assert got.tokens == ref[:n] and (n == 32 or ref[n] == lm.tokenizer.eot_id)

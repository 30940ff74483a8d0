"""Hugging Face <-> llmgen: import Llama-family and GPT-2 models (HF folders, the hub, GGUF files)
and the maps that export llmgen checkpoints as plain `transformers` models (interop/export.py).

The weight maps are the whole story: names differ, shapes do not, except GPT-2's Conv1D layers
(stored as (in, out), so they are transposed) and its fused q/k/v projection (split in three).
HF Llama checkpoints already use the rotate-half RoPE layout our model uses; transformers'
GGUF loader undoes llama.cpp's q/k permutation, so GGUF files go through transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from llmgen import ui
from llmgen.version import __version__
from llmgen.atomic import atomic_dir
from llmgen.config import ModelConfig
from llmgen.data.tokenizer import Tokenizer
from llmgen.errors import LlmgenError
from llmgen.hub import require_hub

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED = LLAMA_TYPES + ("gpt2",)


def cache_root() -> Path:
    return Path(os.environ.get("LLMGEN_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmgen"))


# ----------------------------------------------------------------------------------------------
# Config and weight maps


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Our ModelConfig for a transformers config; unsupported features are refused by name."""
    mt = hf.model_type
    if mt not in SUPPORTED:
        raise LlmgenError(f"model_type {mt!r} is not supported; llmgen imports {', '.join(SUPPORTED)} "
                          f"(Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2, GPT-2)")
    if mt == "gpt2":
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LlmgenError(f"GPT-2 with activation {hf.activation_function!r} is not supported (only gelu_new)")
        return ModelConfig(preset=None, arch="gpt2", n_layer=hf.n_layer, n_head=hf.n_head, d_model=hf.n_embd,
                           d_ff=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, vocab_size=hf.vocab_size,
                           tie_embeddings=getattr(hf, "tie_word_embeddings", True), norm_eps=hf.layer_norm_epsilon)
    head_dim = getattr(hf, "head_dim", None)
    if head_dim and head_dim != hf.hidden_size // hf.num_attention_heads:
        raise LlmgenError(f"{mt}: head_dim {head_dim} differs from hidden_size / num_attention_heads; not supported")
    if getattr(hf, "mlp_bias", False) or (mt == "llama" and getattr(hf, "attention_bias", False)):
        raise LlmgenError(f"{mt}: MLP/output-projection biases are not supported")
    scale = 1.0
    rs = getattr(hf, "rope_scaling", None) or {}
    rtype = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if rtype == "linear":
        scale = float(rs["factor"])
    elif rtype != "default":
        raise LlmgenError(f"{mt}: RoPE scaling {rtype!r} is not supported (default and linear are)")
    theta = getattr(hf, "rope_theta", None)
    if theta is None:
        theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    max_len = hf.max_position_embeddings
    window = getattr(hf, "sliding_window", None)
    if mt == "mistral" and window and window < max_len:
        ui.info(f"mistral sliding window {window}: the imported model's context is capped at {window} tokens")
        max_len = window
    return ModelConfig(preset=None, arch="llama", n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                       n_kv_head=hf.num_key_value_heads or hf.num_attention_heads, d_model=hf.hidden_size,
                       d_ff=hf.intermediate_size, max_seq_len=max_len, vocab_size=hf.vocab_size,
                       tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), rope_theta=float(theta),
                       norm_eps=hf.rms_norm_eps, qkv_bias=mt == "qwen2", rope_scaling_factor=scale)


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    """ours -> HF names for llama-style models."""
    m = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layer):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        m[a + "norm1.weight"] = b + "input_layernorm.weight"
        m[a + "norm2.weight"] = b + "post_attention_layernorm.weight"
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[f"{a}attn.{ours}.weight"] = f"{b}self_attn.{theirs}.weight"
            if cfg.qkv_bias and ours != "wo":
                m[f"{a}attn.{ours}.bias"] = f"{b}self_attn.{theirs}.bias"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            m[f"{a}mlp.{ours}.weight"] = f"{b}mlp.{theirs}.weight"
    return m


def hf_to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers state dict -> ours."""
    sd = {k.removeprefix("base_model."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    try:
        if cfg.arch == "llama":
            for ours, theirs in _llama_names(cfg).items():
                out[ours] = sd[theirs]
            return out
        p = "transformer." if "transformer.wte.weight" in sd else ""
        out["tok_emb.weight"], out["pos_emb.weight"] = sd[p + "wte.weight"], sd[p + "wpe.weight"]
        out["norm_f.weight"], out["norm_f.bias"] = sd[p + "ln_f.weight"], sd[p + "ln_f.bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        C = cfg.d_model
        for i in range(cfg.n_layer):
            a, b = f"blocks.{i}.", f"{p}h.{i}."
            for n_ours, n_theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{a}{n_ours}.weight"], out[f"{a}{n_ours}.bias"] = sd[f"{b}{n_theirs}.weight"], sd[f"{b}{n_theirs}.bias"]
            w = sd[f"{b}attn.c_attn.weight"].t()  # Conv1D (C, 3C) -> (3C, C)
            bias = sd[f"{b}attn.c_attn.bias"]
            for j, name in enumerate(("wq", "wk", "wv")):
                out[f"{a}attn.{name}.weight"] = w[j * C:(j + 1) * C].contiguous()
                out[f"{a}attn.{name}.bias"] = bias[j * C:(j + 1) * C].contiguous()
            out[f"{a}attn.wo.weight"], out[f"{a}attn.wo.bias"] = sd[f"{b}attn.c_proj.weight"].t().contiguous(), sd[f"{b}attn.c_proj.bias"]
            out[f"{a}mlp.w1.weight"], out[f"{a}mlp.w1.bias"] = sd[f"{b}mlp.c_fc.weight"].t().contiguous(), sd[f"{b}mlp.c_fc.bias"]
            out[f"{a}mlp.w2.weight"], out[f"{a}mlp.w2.bias"] = sd[f"{b}mlp.c_proj.weight"].t().contiguous(), sd[f"{b}mlp.c_proj.bias"]
        return out
    except KeyError as e:
        raise LlmgenError(f"the checkpoint lacks weight {e.args[0]!r} that a {cfg.arch} model of this config needs; "
                          f"the files are incomplete or of another architecture") from None


def ours_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.arch == "llama":
        out = {theirs: sd[ours] for ours, theirs in _llama_names(cfg).items()}
        if cfg.tie_embeddings:
            out["lm_head.weight"] = sd["tok_emb.weight"]
        return out
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        a, b = f"blocks.{i}.", f"transformer.h.{i}."
        for n_ours, n_theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{b}{n_theirs}.weight"], out[f"{b}{n_theirs}.bias"] = sd[f"{a}{n_ours}.weight"], sd[f"{a}{n_ours}.bias"]
        out[f"{b}attn.c_attn.weight"] = torch.cat([sd[f"{a}attn.{n}.weight"] for n in ("wq", "wk", "wv")]).t().contiguous()
        out[f"{b}attn.c_attn.bias"] = torch.cat([sd[f"{a}attn.{n}.bias"] for n in ("wq", "wk", "wv")])
        out[f"{b}attn.c_proj.weight"], out[f"{b}attn.c_proj.bias"] = sd[f"{a}attn.wo.weight"].t().contiguous(), sd[f"{a}attn.wo.bias"]
        out[f"{b}mlp.c_fc.weight"], out[f"{b}mlp.c_fc.bias"] = sd[f"{a}mlp.w1.weight"].t().contiguous(), sd[f"{a}mlp.w1.bias"]
        out[f"{b}mlp.c_proj.weight"], out[f"{b}mlp.c_proj.bias"] = sd[f"{a}mlp.w2.weight"].t().contiguous(), sd[f"{a}mlp.w2.bias"]
    return out


def hf_config_from_ours(cfg: ModelConfig, tok) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config  # slow to import: only when converting

    ids = dict(bos_token_id=tok.token_id(tok.extra_config.get("bos_token") or tok.eos_token), eos_token_id=tok.eot_id,
               pad_token_id=tok.pad_id)
    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_inner=cfg.ffn_hidden, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=cfg.tie_embeddings, architectures=["GPT2LMHeadModel"], **ids)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_kv, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", **ids)
    if cfg.rope_scaling_factor != 1.0:
        common["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    if cfg.qkv_bias:
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False, **common)


# ----------------------------------------------------------------------------------------------
# Import


def _load_hf(source: str):
    """(transformers model, tokenizer) for an HF folder, hf:<hub id> or a .gguf file, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # slow to import

    kwargs: dict[str, Any] = {}
    if source.startswith("hf:"):
        require_hub(source)
        where = source[3:]
    elif source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise LlmgenError(f"{source} does not exist; fetch SmolLM2 with `bash scripts/fetch_smollm2.sh`")
        try:
            import gguf  # noqa: F401  (optional extra: llmgen[gguf])
        except ImportError:
            raise LlmgenError("reading .gguf files needs the gguf package: pip install 'llmgen[gguf]'") from None
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        where = source
        cfg_file = Path(source) / "config.json"
        if not cfg_file.is_file():
            raise LlmgenError(f"{source} is not a Hugging Face model folder (config.json missing)")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlmgenError(f"{cfg_file}: not valid JSON ({e}); the model folder is damaged") from None
        if isinstance(raw, dict) and raw.get("auto_map"):
            raise LlmgenError(f"{source} was refused: its config.json asks for custom Python code (auto_map), and "
                              f"llmgen never runs code shipped with a model; import a standard {'/'.join(SUPPORTED)} "
                              f"model")
    try:
        hf_cfg = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise LlmgenError(f"cannot read the model config of {source}: {str(e).splitlines()[0][:200]}") from None
    model_config_from_hf(hf_cfg)  # refuse unsupported types before loading weights
    if kwargs and hf_cfg.model_type == "gpt2":  # transformers reads GGUF's context and MLP sizes into unused fields
        hf_cfg.n_positions = getattr(hf_cfg, "n_ctx", hf_cfg.n_positions)
        hf_cfg.n_inner = getattr(hf_cfg, "feed_forward_length", hf_cfg.n_inner)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, config=hf_cfg, dtype=torch.float32, **kwargs)
    except (pickle.UnpicklingError, OSError) as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only" in str(e):
            raise LlmgenError(f"the weights of {source} were refused: the file holds Python objects that could run "
                              f"code when loaded; use a model saved as safetensors") from None
        raise LlmgenError(f"cannot read the weights of {source}: {str(e).splitlines()[0][:200]}") from None
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if kwargs:
        _restore_pre_tokenizer(tok, Path(source))
    return model, tok


def _restore_pre_tokenizer(hf_tok, gguf_path: Path) -> None:
    """transformers builds every GGUF byte-level tokenizer with GPT-2's pre-tokenizer; SmolLM's (named
    `smollm` in the file) also splits digits one by one, as the original tokenizer and llama.cpp do."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if pre == "smollm" and backend is not None and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])


def _our_tokenizer(hf_tok):
    if not getattr(hf_tok, "is_fast", False):
        raise LlmgenError("the model's tokenizer has no fast (tokenizers) version; llmgen needs tokenizer.json")
    extra = {k: str(getattr(hf_tok, k)) for k in ("bos_token", "unk_token") if getattr(hf_tok, k, None)}
    eos = str(hf_tok.eos_token) if hf_tok.eos_token else None
    tmpl = hf_tok.chat_template if isinstance(getattr(hf_tok, "chat_template", None), str) else None
    return Tokenizer(hf_tok.backend_tokenizer, chat_template=tmpl, eos_token=eos,
                     pad_token=str(hf_tok.pad_token) if hf_tok.pad_token else None, kind="pretrained",
                     extra_config=extra)


def _source_key(source: str) -> str:
    p = Path(source)
    stamp = ""
    if p.exists():
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
        source = str(p.resolve())
    return hashlib.sha256(f"{source}|{stamp}".encode()).hexdigest()[:16]


def import_model(source: str, output: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Convert SOURCE into an llmgen checkpoint folder (cached: a second import is instant)."""

    cached = cache_root() / "imports" / _source_key(source)
    if output is None:
        output = cached
    output = Path(output)
    if (output / "model.safetensors").is_file() and (output / "config.json").is_file():
        try:
            meta = json.loads((output / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}  # a damaged earlier import: import again (with --overwrite for an --output folder)
        if meta.get("import_key") == _source_key(source):
            return output
        if not overwrite:
            raise LlmgenError(f"{output} already holds another model; pass --overwrite or choose another --output")
    elif output.exists() and any(output.iterdir()) and not overwrite:
        raise LlmgenError(f"{output} exists and is not empty; pass --overwrite or choose another --output")
    if output != cached and (cached / "model.safetensors").is_file():
        with atomic_dir(output) as tmp:  # the new copy beside the old one, swapped in when complete
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
        return output
    ui.info(f"importing {source} ...")
    hf_model, hf_tok = _load_hf(source)
    cfg = model_config_from_hf(hf_model.config)
    sd = hf_to_ours(hf_model.state_dict(), cfg)
    tok = _our_tokenizer(hf_tok)
    with atomic_dir(output) as tmp:  # a folder given with --overwrite is replaced only once this one is complete
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()
                   if not (cfg.tie_embeddings and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(tmp)
        meta = {"model": dataclasses.asdict(cfg), "llmgen_version": __version__, "kind": "import", "source": source,
                "hf_model_type": hf_model.config.model_type, "import_key": _source_key(source)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    n = sum(v.numel() for v in tensors.values())
    ui.info(f"imported {hf_model.config.model_type} ({n / 1e6:.1f}M parameters) into {output}")
    return output

"""Export llmgen checkpoints as GGUF files (llama.cpp, ollama), with an ollama Modelfile beside them.

Written with the `gguf` package, the writer llama.cpp's own converter uses. Three facts do the work:

- names and metadata: our layers map one to one onto llama.cpp's `token_embd`, `blk.N.attn_q` ...
  tensors, and the config onto its `<arch>.context_length` ... keys;
- RoPE layout: our q/k projections (like Hugging Face's) rotate the two halves of each head; llama.cpp's
  `llama` architecture rotates interleaved pairs, so their rows are permuted (its `qwen2` architecture
  uses halves, as we do: no permutation);
- the tokenizer: llama.cpp re-implements each pre-tokenizer it knows under a name (`tokenizer.ggml.pre`).
  We pick the name whose pre-tokenizer is the one in our tokenizer.json, compared by structure and
  regex, and refuse a tokenizer that matches none rather than write a file that tokenizes differently.
  SentencePiece-style tokenizers (byte fallback, "▁" for spaces) go as llama.cpp's `llama` model,
  whose merge order is carried by the scores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmgen import ui
from llmgen.atomic import atomic_file, atomic_write_text
from llmgen.config import ModelConfig, Persona
from llmgen.data.chat_format import CHATML, NAMED_TEMPLATES, PromptFormat, render_chat_template
from llmgen.errors import LlmgenError
from llmgen.interop.load import LoadedModel, load_model

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Pre-tokenizers llama.cpp implements, as tokenizer.json writes them (src/llama-vocab.cpp quotes the
# same regexes as "original regex from tokenizer.json").
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # (pre-tokenizer steps, normalizer) -> llama.cpp's name
    ((("ByteLevel", True),), None): "gpt-2",  # GPT-2's regex inside ByteLevel: ours, GPT-2's
    ((("Digits", True), ("ByteLevel", True)), None): "smollm",  # SmolLM/SmolLM2, StarCoder
    ((("Split", LLAMA3_REGEX, "Isolated"), ("ByteLevel", False)), None): "llama-bpe",  # Llama 3
    ((("Split", QWEN2_REGEX, "Isolated"), ("ByteLevel", False)), "NFC"): "qwen2",
}

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style)
    pre: Optional[str]
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: Optional[list[float]] = None


def _pre_key(tj: dict) -> tuple:
    """The pre-tokenizer of a tokenizer.json reduced to what decides how text is split."""
    pre = tj.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    key = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                return ("ByteLevel with add_prefix_space",)
            key.append(("ByteLevel", s.get("use_regex", True)))
        elif kind == "Digits":
            key.append(("Digits", s.get("individual_digits", False)))
        elif kind == "Split" and not s.get("invert"):
            pattern = s.get("pattern", {})
            key.append(("Split", pattern.get("Regex", pattern.get("String")), s.get("behavior")))
        else:
            key.append((kind,))
    norm = tj.get("normalizer")
    return tuple(key), (norm or {}).get("type")


def _spm_style(tj: dict) -> bool:
    """A SentencePiece BPE written as tokenizer.json (Llama 2, TinyLlama, Mistral): byte fallback, and
    spaces turned into "▁" with one prepended, by the normalizer or a Metaspace pre-tokenizer."""
    model, norm, pre = tj.get("model", {}), tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    by_norm = [x.get("type") for x in steps] == ["Prepend", "Replace"] and steps[0].get("prepend") == "\u2581" \
        and steps[1].get("content") == "\u2581" and steps[1].get("pattern", {}).get("String") == " " and not pre
    by_pre = pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" \
        and pre.get("prepend_scheme", "always") in ("always", "first") and not norm
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and (by_norm or by_pre)


def _table(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their types; rows past the tokenizer become unused placeholders."""
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise LlmgenError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows; "
                          f"the checkpoint is inconsistent")
    tokens: list[Optional[str]] = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    added = {t.content: t.special for t in tok.tok.get_added_tokens_decoder().values()}
    types = [NORMAL] * vocab_size
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
        elif text in added:
            types[i] = CONTROL if added[text] else USER_DEFINED
    return tokens, types


def gguf_vocab(tok, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a tokenizer: byte-level BPEs as llama.cpp's `gpt2` model with the name of
    the pre-tokenizer that splits like ours; SentencePiece-style BPEs as its `llama` model, whose merge
    order the scores carry (a token made by merge rank r scores -r)."""
    tj = json.loads(tok.tok.to_str())
    model = tj.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if _spm_style(tj):
        tokens, types = _table(tok, vocab_size)
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}  # the first merge making it
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
        unk = model.get("unk_token")
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types[i] = BYTE
            elif t == unk:
                types[i] = UNKNOWN
        return GGUFVocab("llama", None, tokens, types, [], scores)
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise LlmgenError("GGUF export supports byte-level BPE tokenizers (llmgen's bpe and bytes, GPT-2, SmolLM2, "
                          "Llama 3, Qwen2) and SentencePiece-style ones (Llama 2, TinyLlama, Mistral); this one is a "
                          f"{model.get('type')} tokenizer llama.cpp would split differently: export --format hf instead")
    key = _pre_key(tj)
    if not merges:
        pre = "gpt-2"  # no merges: every piece falls apart into its bytes, however the text is split first
    elif key in PRE_TOKENIZERS:
        pre = PRE_TOKENIZERS[key]
    else:
        raise LlmgenError(f"the tokenizer's pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:160]} is none of "
                          f"those llama.cpp implements (gpt-2, smollm, llama-bpe, qwen2); a GGUF file would tokenize "
                          f"differently, so none was written")
    tokens, types = _table(tok, vocab_size)
    return GGUFVocab("gpt2", pre, tokens, types, merges)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LlmgenError("GGUF export needs the gguf package: pip install 'llmgen[gguf]'") from None
    return gguf


def _writer(gguf) -> type:
    """gguf's writer, able to store an empty array: the format allows one, the package's writer refuses it."""
    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)
    return Writer


# ----------------------------------------------------------------------------------------------
# Weights


def _interleave_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (each head: first halves, then second halves) to
    llama.cpp's interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1} ...)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp's tensor names (shapes as torch stores them: (out, in))."""
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    if cfg.arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
        out["output_norm.bias"] = sd["norm_f.bias"]
    for i in range(cfg.n_layer):
        a, b = f"blocks.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"], out[b + "ffn_norm.weight"] = sd[a + "norm1.weight"], sd[a + "norm2.weight"]
        out[b + "attn_output.weight"], out[b + "ffn_down.weight"] = sd[a + "attn.wo.weight"], sd[a + "mlp.w2.weight"]
        if cfg.arch == "gpt2":
            out[b + "attn_qkv.weight"] = torch.cat([sd[f"{a}attn.{n}.weight"] for n in ("wq", "wk", "wv")])
            out[b + "attn_qkv.bias"] = torch.cat([sd[f"{a}attn.{n}.bias"] for n in ("wq", "wk", "wv")])
            out[b + "ffn_up.weight"] = sd[a + "mlp.w1.weight"]
            for ours, theirs in (("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("attn.wo", "attn_output"),
                                 ("mlp.w1", "ffn_up"), ("mlp.w2", "ffn_down")):
                out[f"{b}{theirs}.bias"] = sd[f"{a}{ours}.bias"]
            continue
        q, k = sd[a + "attn.wq.weight"], sd[a + "attn.wk.weight"]
        if arch == "llama":
            q, k = _interleave_rope(q, cfg.n_head), _interleave_rope(k, cfg.n_kv)
        out[b + "attn_q.weight"], out[b + "attn_k.weight"], out[b + "attn_v.weight"] = q, k, sd[a + "attn.wv.weight"]
        if cfg.qkv_bias:  # qwen2: rotate-half like ours, so the biases need no permutation either
            for n, theirs in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v")):
                out[f"{b}{theirs}.bias"] = sd[f"{a}attn.{n}.bias"]
        out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = sd[a + "mlp.w1.weight"], sd[a + "mlp.w3.weight"]
    return out


def _encode(name: str, t: torch.Tensor, outtype: str, fell_back: list[str]):
    """(array, raw ggml type) for one tensor: vectors (norms, biases) stay f32, as llama.cpp expects."""
    gguf = _gguf()
    a = t.detach().float().cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if a.ndim == 1 or outtype == "f32":
        return a, None
    if outtype == "q8_0":
        if a.shape[-1] % 32 == 0:
            return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
        fell_back.append(name)  # q8_0 blocks are 32 values of a row
        outtype = "f16"
    if outtype == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    return a.astype(np.float16), None


# ----------------------------------------------------------------------------------------------
# The ollama Modelfile

GO_TEMPLATES = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n'),
    "alpaca": ('Below is an instruction that describes a task. Write a response that appropriately completes the '
               'request.\n\n{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n'
               '### Response:\n{{ .Response }}'),
    "plain": '{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}\n{{ .Response }}',
}


def _template_family(lm: LoadedModel) -> tuple[Optional[str], Optional[str]]:
    """(named format the prompts are written in, default system prompt the template adds); (None, None)
    when the chat template is none we can translate to ollama's Go templates."""
    fmt = lm.prompt_format or PromptFormat.choose(lm.tokenizer, None)
    if fmt.name != "chat_template":
        return fmt.name, None
    tok = lm.tokenizer
    probe = [{"role": "system", "content": "\x01S"}, {"role": "user", "content": "\x01U"},
             {"role": "assistant", "content": "\x01A"}, {"role": "user", "content": "\x01V"}]
    try:
        theirs = render_chat_template(tok, probe, True, tok.chat_template)
        ours = render_chat_template(tok, probe, True, CHATML)
        if theirs != ours:
            return None, None
        alone = render_chat_template(tok, probe[1:2], True, tok.chat_template)
    except LlmgenError:
        return None, None
    expected = render_chat_template(tok, probe[1:2], True, CHATML)
    if alone == expected:
        return "chatml", None
    head = "<|im_start|>system\n"
    if alone.startswith(head) and alone.endswith(expected) and alone[:-len(expected)].endswith("<|im_end|>\n"):
        return "chatml", alone[len(head):-len(expected) - len("<|im_end|>\n")]  # e.g. SmolLM2's
    return None, None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise LlmgenError('a system prompt with """ in it cannot be written into a Modelfile; remove the triple quotes')
    return f'"""{text}"""'


def modelfile(lm: LoadedModel, gguf_name: str, persona: Optional[Persona] = None) -> str:
    """An ollama Modelfile for the exported file: template, stops, system prompt, persona defaults."""
    family, default_system = _template_family(lm)
    lines = ["# made by `llmgen export --format gguf`; run: ollama create mymodel -f Modelfile", f"FROM ./{gguf_name}"]
    if family is None:
        ui.info("the tokenizer's chat template is neither ChatML, Alpaca nor plain: the Modelfile passes prompts "
                "through as they are ({{ .Prompt }}); edit its TEMPLATE to match the model's format")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    else:
        lines.append(f"TEMPLATE {_quoted(GO_TEMPLATES[family])}")
    system = persona.system if persona else default_system
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    fmt = lm.prompt_format or PromptFormat.choose(lm.tokenizer, None)
    stops = dict.fromkeys(fmt.stops(lm.tokenizer) + [lm.tokenizer.eos_token])
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops if s.strip()]
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
             "frequency_penalty": "frequency_penalty", "seed": "seed", "max_new_tokens": "num_predict"}
    for key, value in (persona.sampling if persona else {}).items():
        if key in names and value is not None:
            lines.append(f"PARAMETER {names[key]} {value}")
    lines.append(f"PARAMETER num_ctx {lm.model.cfg.max_seq_len}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The file


def export_gguf(model_path: Optional[str], output: Path, outtype: str = "f16", overwrite: bool = False,
                run_dir: str = "runs/quickstart", persona: Optional[Persona] = None) -> tuple[Path, Path]:
    """Write `output` (.gguf) and a Modelfile beside it; returns both paths. Nothing is replaced unless
    `overwrite`; both files are written through a temporary file and a rename."""
    gguf = _gguf()
    output = Path(output)
    if outtype not in OUTTYPES:
        raise LlmgenError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    if output.suffix != ".gguf":
        raise LlmgenError(f"--output {output} should end in .gguf (llama.cpp and ollama look for it)")
    mf_path = output.with_name("Modelfile")
    for p in (output, mf_path):
        if p.exists() and not overwrite:
            raise LlmgenError(f"{p} exists; pass --overwrite to replace it or choose another --output")
    lm = load_model(model_path, run_dir, merge=True)
    cfg, tok = lm.model.cfg, lm.tokenizer
    if cfg.rope_scaling_factor != 1.0 and cfg.arch == "llama" and cfg.qkv_bias:
        raise LlmgenError("GGUF export of a qwen2 model with RoPE scaling is not supported")
    arch = "gpt2" if cfg.arch == "gpt2" else "qwen2" if cfg.qkv_bias else "llama"
    vocab = gguf_vocab(tok, cfg.vocab_size)
    tensors = gguf_tensors(lm.model.state_dict(), cfg, arch)
    w = None
    with atomic_file(output) as tmp:
        w = _writer(gguf)(str(tmp), arch)
        w.add_name(lm.folder.parent.name if lm.folder.name in ("final",) else lm.folder.name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_head_count_kv(cfg.n_kv)
            w.add_rope_dimension_count(cfg.head_size)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            if cfg.rope_scaling_factor != 1.0:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(cfg.rope_scaling_factor)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(vocab.model)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.model == "gpt2":
            w.add_tokenizer_pre(vocab.pre)
            # llama.cpp requires the merges key even when the list is empty (the bytes tokenizer)
            w.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType.STRING)
        else:
            w.add_token_scores(vocab.scores)
            w.add_add_space_prefix(True)  # "▁" before the text, as the tokenizer's normalizer does
            unk = tok.tok.token_to_id(json.loads(tok.tok.to_str())["model"].get("unk_token") or "")
            if unk is not None:
                w.add_unk_token_id(unk)
        bos = tok.token_id(tok.extra_config.get("bos_token") or "") if tok.extra_config.get("bos_token") else None
        w.add_bos_token_id(bos if bos is not None else tok.eot_id)
        w.add_eos_token_id(tok.eot_id)
        if tok.pad_id is not None:
            w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)  # llmgen never prepends one
        fmt = lm.prompt_format
        template = NAMED_TEMPLATES[fmt.name] if fmt is not None and fmt.name != "chat_template" else tok.chat_template
        if template:
            w.add_chat_template(template)
        fell_back: list[str] = []
        for name, t in tensors.items():
            data, raw = _encode(name, t, outtype, fell_back)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    if fell_back:
        ui.info(f"{len(fell_back)} tensor(s) whose rows are not a multiple of 32 values were written as f16 "
                f"instead of q8_0 (e.g. {fell_back[0]})")
    atomic_write_text(mf_path, modelfile(lm, output.name, persona))
    return output, mf_path

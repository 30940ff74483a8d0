"""Export llmgen checkpoints for other tools: a plain `transformers` model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from llmgen.atomic import atomic_dir
from llmgen.data.chat_format import NAMED_TEMPLATES
from llmgen.errors import LlmgenError
from llmgen.interop.hf import hf_config_from_ours, ours_to_hf
from llmgen.interop.load import load_model


def export_hf(model_path: Optional[str], output: Path, overwrite: bool = False, run_dir: str = "runs/quickstart") -> Path:
    """Write a transformers model folder (merged weights, tokenizer with chat template, generation config)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast  # slow to import

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise LlmgenError(f"{output} exists and is not empty; pass --overwrite to replace it or choose another --output")
    lm = load_model(model_path, run_dir, merge=True)
    cfg, tok = lm.model.cfg, lm.tokenizer
    hf_cfg = hf_config_from_ours(cfg, tok)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    sd = ours_to_hf({k: v.detach().float() for k, v in lm.model.state_dict().items()}, cfg)
    hf_model.load_state_dict(sd, strict=False, assign=True)
    hf_model.tie_weights()
    missing = [n for n, p in hf_model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"export left weights unset: {missing[:3]}")
    template = tok.chat_template
    if lm.prompt_format is not None and lm.prompt_format.name != "chat_template":
        template = NAMED_TEMPLATES[lm.prompt_format.name]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token=tok.eos_token, pad_token=tok.pad_token,
                                     chat_template=template, clean_up_tokenization_spaces=False,
                                     **{k: v for k, v in tok.extra_config.items() if k in ("bos_token", "unk_token")})
    with atomic_dir(output) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                         pad_token_id=hf_cfg.pad_token_id).save_pretrained(tmp)
    return output

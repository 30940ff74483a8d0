"""Find and load a model from anything a user can name: a run or checkpoint folder, an HF model
folder, hf:<hub id>, or a .gguf file (the last three are imported once into llmgen checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from llmgen.data.chat_format import PromptFormat
from llmgen.data.tokenizer import Tokenizer
from llmgen.errors import LlmgenError
from llmgen.interop.hf import import_model
from llmgen.model.checkpoint import build_model, is_checkpoint, newest_checkpoint, read_model_config
from llmgen.model.lora import load_adapter


def resolve_model_dir(path: Optional[str], run_dir: str = "runs/quickstart") -> Path:
    """A checkpoint folder from --model (run dir, checkpoint dir, HF dir, hf:<id>, .gguf) or the default run."""
    if path is None:
        found = newest_checkpoint(Path(run_dir))
        if found is None:
            raise LlmgenError(f"no trained model found under {run_dir}; run `llmgen pretrain` first or pass --model "
                              f"(a run or checkpoint directory, an HF model folder or a .gguf file)")
        return found
    path = os.path.expanduser(path)
    p = Path(path)
    if path.startswith("hf:") or p.suffix == ".gguf" or (p.is_dir() and _is_hf_model_dir(p)):
        return import_model(path)
    if not p.exists():
        raise LlmgenError(f"model {path} does not exist; give a run directory, a checkpoint directory, an HF model "
                          f"folder, hf:<hub id> or a .gguf file")
    if is_checkpoint(p):
        return p
    if (p / "config.json").is_file():
        raise LlmgenError(f"checkpoint {p} is incomplete: model.safetensors is missing")
    if is_checkpoint(p / "final"):
        return p / "final"
    found = newest_checkpoint(p)
    if found is None:
        raise LlmgenError(f"{p} holds no checkpoint (no final/ or checkpoints/step-N with config.json and "
                          f"model.safetensors); train one or point --model at a checkpoint folder")
    return found


def _is_hf_model_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    folder: Path
    meta: dict
    prompt_format: Optional[PromptFormat] = None  # when the model was instruction-finetuned


def load_model(path: Optional[str] = None, run_dir: str = "runs/quickstart", merge: bool = True) -> LoadedModel:
    """Build the model of a checkpoint (LoRA adapters applied on their base and merged) with its tokenizer."""
    folder = resolve_model_dir(path, run_dir)
    cfg, meta = read_model_config(folder)
    if "adapter" in meta:
        base = load_model(meta["adapter"]["base"], run_dir)
        model = load_adapter(base.model, folder, meta["adapter"], merge=merge)
    else:
        model = build_model(folder, cfg)
    if not (folder / "tokenizer.json").is_file():
        raise LlmgenError(f"checkpoint {folder} is incomplete: tokenizer.json is missing")
    tok = Tokenizer.load(folder)
    fmt = PromptFormat(**meta["prompt_format"]) if meta.get("prompt_format") else None
    return LoadedModel(model, tok, folder, meta, fmt)

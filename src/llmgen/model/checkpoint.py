"""Checkpoint I/O: `model.safetensors` + `config.json` + tokenizer files, written atomically.

    <run_dir>/checkpoints/step-<N>/   model.safetensors, config.json, tokenizer.json,
                                      tokenizer_config.json, training_state/state.pt
    <run_dir>/final/                  the checkpoint other commands use (no training state)

Weights are only read from safetensors; training state only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model

from llmgen import __version__
from llmgen.atomic import atomic_dir
from llmgen.config import ModelConfig, _to_dataclass
from llmgen.errors import LlmgenError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STATE_FILE = "training_state/state.pt"


def save_checkpoint(folder: Path, model: torch.nn.Module, tokenizer_dir: Path, info: dict[str, Any],
                    state: Optional[dict[str, Any]] = None, save_weights=None) -> None:
    """Write a complete checkpoint folder in one rename (`save_weights(tmp, model)` replaces the
    full safetensors file, e.g. by a LoRA adapter)."""
    with atomic_dir(folder) as tmp:
        if save_weights is not None:
            save_weights(tmp, model)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        cfg: ModelConfig = model.cfg
        meta = {"model": dataclasses.asdict(cfg), "llmgen_version": __version__, **info}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if state is not None:
            (tmp / "training_state").mkdir()
            torch.save(state, tmp / STATE_FILE)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Publish a checkpoint (without its training state) at `dst`, atomically."""
    with atomic_dir(dst) as tmp:
        for item in Path(src).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)


def read_model_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise LlmgenError(f"{folder} is not an llmgen checkpoint (config.json missing)")
    meta = json.loads(cfg_file.read_text())
    return _to_dataclass(ModelConfig, meta["model"], str(cfg_file), "model."), meta


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise LlmgenError(f"{folder}: model.safetensors is missing; the checkpoint is incomplete")
    try:
        missing, unexpected = _st_load_model(model, str(path), strict=False)
    except Exception as e:
        raise LlmgenError(f"{path}: cannot be read as safetensors ({str(e)[:150]}); the file is corrupt") from None
    if missing or unexpected:
        raise LlmgenError(f"{path}: weights do not match the model in config.json "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / STATE_FILE).is_file() and _is_checkpoint(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Finding and loading a model for generate / chat / eval / finetune / export


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "adapter_model.safetensors").is_file())


def newest_checkpoint(root: Path) -> Optional[Path]:
    """The most recently written checkpoint under `root` (its final/, its checkpoints, nested runs)."""
    found = []
    for pattern in ("final", "*/final", "checkpoints/step-*", "*/checkpoints/step-*"):
        for p in Path(root).glob(pattern):
            if _is_checkpoint(p):
                found.append(p)
    if not found:
        return None
    # prefer final/ over the step checkpoint it was copied from (same content, slightly later mtime)
    return max(found, key=lambda p: ((p / "config.json").stat().st_mtime, p.name == "final"))


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
        from llmgen.model.convert import import_model

        return import_model(path)
    if not p.exists():
        raise LlmgenError(f"model {path} does not exist; give a run directory, a checkpoint directory, an HF model "
                          f"folder, hf:<hub id> or a .gguf file")
    if _is_checkpoint(p):
        return p
    if (p / "config.json").is_file():
        missing = "model.safetensors"
        raise LlmgenError(f"checkpoint {p} is incomplete: {missing} is missing")
    for sub in ("final",):
        if _is_checkpoint(p / sub):
            return p / sub
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
    prompt_format: Any = None  # data.instruct.PromptFormat when the model was instruction-finetuned


def load_model(path: Optional[str] = None, run_dir: str = "runs/quickstart", merge: bool = True) -> LoadedModel:
    """Build the model of a checkpoint (LoRA adapters applied on their base and merged) with its tokenizer."""
    from llmgen.data.instruct import PromptFormat
    from llmgen.data.tokenizer import Tokenizer
    from llmgen.model.transformer import Transformer

    folder = resolve_model_dir(path, run_dir)
    cfg, meta = read_model_config(folder)
    if "adapter" in meta:
        from llmgen.train.lora import load_adapter

        base = load_model(meta["adapter"]["base"], run_dir)
        model = load_adapter(base.model, folder, meta["adapter"], merge=merge)
    else:
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device="cpu")
        if cfg.tie_embeddings:  # to_empty gives each module its own tensor: tie them again
            model.lm_head.weight = model.tok_emb.weight
        if cfg.arch == "llama":  # non-persistent buffers are not in the file: rebuild them
            from llmgen.model.transformer import rope_tables

            model.rope_cos, model.rope_sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len,
                                                         cfg.rope_theta, cfg.rope_scaling_factor)
        load_weights(model, folder)
    if not (folder / "tokenizer.json").is_file():
        raise LlmgenError(f"checkpoint {folder} is incomplete: tokenizer.json is missing")
    tok = Tokenizer.load(folder)
    fmt = PromptFormat(**meta["prompt_format"]) if meta.get("prompt_format") else None
    return LoadedModel(model, tok, folder, meta, fmt)

"""Checkpoint I/O: `model.safetensors` + `config.json` + tokenizer files, written atomically.

    <run_dir>/checkpoints/step-<N>/   model.safetensors, config.json, tokenizer.json,
                                      tokenizer_config.json, training_state/state.pt
    <run_dir>/final/                  the checkpoint other commands use (no training state)

Weights are only read from safetensors; training state only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model

from llmgen import __version__
from llmgen.atomic import atomic_dir
from llmgen.config import ModelConfig, _to_dataclass
from llmgen.errors import LlmgenError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STATE_FILE = "training_state/state.pt"


def save_checkpoint(folder: Path, model: torch.nn.Module, tokenizer_dir: Path, info: dict[str, Any],
                    state: Optional[dict[str, Any]] = None) -> None:
    """Write a complete checkpoint folder in one rename."""
    with atomic_dir(folder) as tmp:
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
        missing, unexpected = load_model(model, str(path), strict=False)
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
            if m and (p / STATE_FILE).is_file() and (p / "model.safetensors").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)

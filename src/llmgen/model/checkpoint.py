"""Checkpoint I/O: `model.safetensors` + `config.json` + tokenizer files, written atomically.

    <run_dir>/checkpoints/step-<N>/   model.safetensors, config.json, tokenizer.json,
                                      tokenizer_config.json, training_state/state.pt
    <run_dir>/final/                  the checkpoint other commands use (no training state)

Weights are only read from safetensors; training state only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model

from llmgen.atomic import atomic_dir
from llmgen.config import ModelConfig, to_dataclass
from llmgen.errors import LlmgenError
from llmgen.model.transformer import Transformer
from llmgen.version import __version__

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STATE_FILE = "training_state/state.pt"


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
          "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers (their weights are loaded or
    shared afterwards). On meta tensors `torch.nn.init.normal_` takes torch's reference path, whose first
    call imports the compiler: ~1 s of every inference command's start-up, for nothing."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def save_checkpoint(folder: Path, model: torch.nn.Module, tokenizer_dir: Path, info: dict[str, Any],
                    state: Optional[dict[str, Any]] = None, save_weights=None) -> None:
    """Write a complete checkpoint folder in one rename (`save_weights(tmp, model)` replaces the
    full safetensors file, e.g. by a LoRA adapter). On a full disk the message says about how much
    room a checkpoint takes."""
    try:
        _write_checkpoint(folder, model, tokenizer_dir, info, state, save_weights)
    except LlmgenError as e:
        if not str(e).startswith("no space left"):
            raise
        tensors = list(model.state_dict().values()) + _tensors(state)
        need = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2 ** 20
        raise LlmgenError(f"{e} (a checkpoint of this run takes about {need:.0f} MB)") from None


def _tensors(obj: Any) -> list:
    """Every tensor inside nested dicts/lists (the optimizer and RNG state)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _write_checkpoint(folder, model, tokenizer_dir, info, state, save_weights) -> None:
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
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmgenError(f"{cfg_file}: not valid JSON ({e}); the checkpoint's config is damaged: restore it from "
                          f"another checkpoint of the run (its model section is the same)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise LlmgenError(f"{cfg_file}: has no `model` section; it is not an llmgen checkpoint config")
    return to_dataclass(ModelConfig, meta["model"], str(cfg_file), "model."), meta


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise LlmgenError(f"{folder}: model.safetensors is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise LlmgenError(f"{path}: cannot be read as safetensors ({_one_line(e)}); the file is damaged: use "
                          f"another checkpoint of the run") from None
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    clash = [k for k in shapes.keys() & wanted.keys() if shapes[k] != wanted[k]]
    if clash:
        k = sorted(clash)[0]
        raise LlmgenError(f"{path} and config.json disagree: weight {k} is {shapes[k]} in the file but the model that "
                          f"config.json describes needs {wanted[k]}; the weights are readable, so config.json was "
                          f"probably edited: restore it")
    try:
        if next(model.parameters()).is_meta:  # a model built without memory: take the file's tensors as they are
            missing, unexpected = _assign(model, load_file(str(path)))
        else:
            missing, unexpected = _st_load_model(model, str(path), strict=False)
    except Exception as e:
        raise LlmgenError(f"{path}: cannot be read as safetensors ({_one_line(e)}); the file is damaged") from None
    if missing or unexpected:
        raise LlmgenError(f"{path} and config.json disagree: weights missing {list(missing)[:3]}, unexpected "
                          f"{list(unexpected)[:3]}; restore the checkpoint's config.json")


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load `state` into a meta-device model by taking its tensors (no copy unless the file's dtype differs
    from the model's: a bf16 file still gives fp32 parameters, as copying into them did). A file holds one
    name of each group of shared weights (tied embeddings): the other names are pointed at the loaded tensor."""
    groups: dict[int, list[str]] = {}
    own = model.state_dict(keep_vars=True)
    for name, t in own.items():
        groups.setdefault(id(t), []).append(name)
    state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for names in groups.values():
        loaded = [n for n in names if n in state]
        for name in names if loaded else ():
            if name not in state:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, model.get_parameter(loaded[0]))
                missing.remove(name)
    return missing, unexpected


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint, loaded as plain tensors and containers only."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise LlmgenError(f"{path} was refused: it holds Python objects that could run code when loaded, and "
                          f"llmgen loads training state only as plain tensors; delete that checkpoint folder if you "
                          f"did not make it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise LlmgenError(f"{path} is damaged ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / STATE_FILE).is_file() and is_checkpoint(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "adapter_model.safetensors").is_file())


def newest_checkpoint(root: Path) -> Optional[Path]:
    """The most recently written checkpoint under `root` (its final/, its checkpoints, nested runs)."""
    found = []
    for pattern in ("final", "*/final", "checkpoints/step-*", "*/checkpoints/step-*"):
        for p in Path(root).glob(pattern):
            if is_checkpoint(p) and not any(part.startswith(".") for part in p.relative_to(root).parts):
                found.append(p)
    if not found:
        return None
    # prefer final/ over the step checkpoint it was copied from (same content, slightly later mtime)
    return max(found, key=lambda p: ((p / "config.json").stat().st_mtime, p.name == "final"))


def build_model(folder: Path, cfg: Optional[ModelConfig] = None) -> Transformer:
    """The network of a full checkpoint folder, its weights loaded (no memory spent on a random init)."""
    cfg = cfg or read_model_config(folder)[0]
    with on_meta():
        model = Transformer(cfg)
    load_weights(model, folder)  # the file's tensors become the parameters
    model.reset_rope()  # non-persistent buffers are not in the file
    return model

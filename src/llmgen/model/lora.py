"""LoRA through `peft`: adapters on a model's linear layers, saved, loaded and merged.

A LoRA checkpoint stores only the adapter (`adapter_model.safetensors`) plus the path of its
base checkpoint in `config.json`; `load_adapter` rebuilds it and merges it for inference/export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmgen.config import LoraConfig
from llmgen.errors import LlmgenError

ADAPTER_FILE = "adapter_model.safetensors"

# peft is imported where it is used: importing it loads transformers (seconds), which plain
# pretraining and generation never need.


def linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _peft_config(lc: dict[str, Any]):
    import peft

    return peft.LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc.get("dropout", 0.0),
                           target_modules=lc["target_modules"], modules_to_save=lc.get("modules_to_save") or None)


def apply_lora(model: torch.nn.Module, lc: LoraConfig) -> torch.nn.Module:
    import peft

    valid = linear_names(model)
    bad = [t for t in lc.target_modules if t not in valid]
    if bad:
        raise LlmgenError(f"finetune.lora.target_modules: {', '.join(bad)} do not exist in this model; valid names: "
                          f"{', '.join(valid)}")
    children = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    bad = [t for t in lc.modules_to_save if t not in children]
    if bad:
        raise LlmgenError(f"finetune.lora.modules_to_save: {', '.join(bad)} do not exist; e.g. norm_f, lm_head")
    return peft.get_peft_model(model, _peft_config(lora_info(lc)))


def lora_info(lc: LoraConfig) -> dict[str, Any]:
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "target_modules": list(lc.target_modules),
            "modules_to_save": list(lc.modules_to_save)}


def save_adapter(folder: Path, model: torch.nn.Module) -> None:
    from peft import get_peft_model_state_dict

    sd = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(sd, str(Path(folder) / ADAPTER_FILE))
    cfg = model.peft_config["default"].to_dict()
    (Path(folder) / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))


def load_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise LlmgenError(f"{folder}: {ADAPTER_FILE} is missing; the LoRA checkpoint is incomplete")
    res = set_peft_model_state_dict(model, load_file(str(path)))
    if getattr(res, "unexpected_keys", None):
        raise LlmgenError(f"{path}: adapter weights do not fit the base model ({res.unexpected_keys[:3]})")


def load_adapter(base: torch.nn.Module, folder: Path, info: dict[str, Any], merge: bool = True) -> torch.nn.Module:
    import peft

    model = peft.get_peft_model(base, _peft_config(info))
    load_adapter_weights(model, folder)
    return model.merge_and_unload() if merge else model

"""A training run's folder: whether it already holds a run, starting over, which checkpoints to keep,
publishing `final/`, and the RNG states a checkpoint carries for exact resumes.

    <run_dir>/checkpoints/step-<N>/   complete checkpoints (with training_state/)
    <run_dir>/final/                  the checkpoint other commands pick
    <run_dir>/metrics.jsonl, loss.png, tensorboard/, config.yaml
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmgen import ui
from llmgen.errors import LlmgenError
from llmgen.model.checkpoint import copy_checkpoint, list_checkpoints

RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "loss.png", "tensorboard")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.path)

    def step_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step}"

    def holds_run(self) -> bool:
        return bool(self.checkpoints()) or (self.path / "metrics.jsonl").is_file()

    def check_start(self, resume: bool, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one unless told to resume or start over."""
        if self.holds_run() and not resume and not overwrite:
            raise LlmgenError(f"run_dir {self.path} already holds a run; pass --resume to continue it, --overwrite "
                              f"to start over, or set run_dir to a new folder")

    @property
    def replaced(self) -> Path:
        """Where the run that --overwrite replaces waits until the new run has a checkpoint of its own."""
        return self.path / ".replaced-run"

    def clear(self) -> None:
        """Start over: move the previous run's outputs aside (to `replaced`); `drop_replaced` deletes them
        once the new run has saved a checkpoint, so a start-over killed early loses nothing. A run kept
        there by an earlier start-over that never reached a checkpoint stays as it is."""
        keep = not self.replaced.exists()
        if keep:
            self.replaced.mkdir()
        for name in RUN_OUTPUTS:
            p = self.path / name
            if not p.exists():
                continue
            if keep:
                os.replace(p, self.replaced / name)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        ui.info(f"starting over: the previous run is kept in {self.replaced} until this run saves a checkpoint")

    def drop_replaced(self) -> None:
        if self.replaced.exists():
            shutil.rmtree(self.replaced, ignore_errors=True)
            ui.info(f"removed the previous run from {self.replaced}")

    def retain(self, keep_last_n: int, keep: Optional[Path] = None) -> None:
        """Delete all but the newest `keep_last_n` checkpoints, never `keep` (the best one)."""
        for _, old in self.checkpoints()[:-keep_last_n]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def publish_final(self, chosen: Path) -> Path:
        final = self.path / "final"
        copy_checkpoint(chosen, final)
        return final


def rng_state() -> dict:
    """Every RNG the run draws from, as plain tensors and lists (loadable with weights_only=True)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((s["python_version"], tuple(s["python"]), None))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

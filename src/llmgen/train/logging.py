"""What a run leaves behind for people: metrics.jsonl, loss.png and (if installed) TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from llmgen.atomic import atomic_write_text, disk_full_error


class RunLog:
    PLOT_EVERY_S = 30.0  # drawing loss.png takes ~0.2 s (and matplotlib ~0.7 s to import): not at every eval

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.plotted = time.monotonic()  # the first chart after PLOT_EVERY_S of training
        self.path = self.run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            # keep history up to the checkpoint we resume from; later lines are replayed by the run
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill or a full disk
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: optional
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as e:
            raise disk_full_error(e, self.path) or e
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def plot(self, force: bool = False) -> None:
        """Write loss.png: train loss per logged step and val loss per eval; unless `force`, only when the
        last chart is PLOT_EVERY_S old (so a short run's evaluations do not wait on drawing)."""
        if not force and time.monotonic() - self.plotted < self.PLOT_EVERY_S:
            return
        self.plotted = time.monotonic()
        import matplotlib  # heavy (~0.5 s); only when a chart is written

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        fig.tight_layout()
        tmp = self.run_dir / ".loss.png.tmp.png"
        try:
            fig.savefig(tmp)
            tmp.replace(self.run_dir / "loss.png")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise disk_full_error(e, self.run_dir / "loss.png") or e
        finally:
            plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

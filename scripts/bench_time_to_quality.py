#!/usr/bin/env python
"""Time to quality on tinyshakespeare: `configs/shakespeare-char.yaml` against nanoGPT's CPU recipe.

Both train a character model on the same text with the same split (the last 10 % validates), one
after the other; each is timed from the launch of its training process to the first evaluation whose
validation loss is at most --target nats/char (1.886: what nanoGPT's recipe ends at), and stopped
there. Data preparation runs before and is timed apart (nanoGPT's `prepare.py` on the same text;
`llmgen prepare`). nanoGPT is cloned from its public repository into a temp dir (--nanogpt: another
place to clone it from, e.g. a local mirror), never vendored; its recipe is the one its README gives for a CPU:

    train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=100 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

    python scripts/bench_time_to_quality.py --text ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import report

REPO = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def watch(cmd: list[str], cwd: Path, hit, timeout: float, log: Path) -> tuple[float, dict]:
    """Run cmd (output to `log`); `hit(lines)` is polled and returns a dict once the target is reached.
    Returns (seconds from launch to the hit, the hit) and stops the process there."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while time.perf_counter() - t0 < timeout:
                lines = log.read_text(errors="replace").splitlines()
                found = hit(lines)
                if found:
                    return time.perf_counter() - t0, found
                if proc.poll() is not None:
                    raise SystemExit(f"{cmd[:3]} ended (exit {proc.returncode}) before reaching the target:\n"
                                     + "\n".join(lines[-15:]))
                time.sleep(0.05)
            raise SystemExit(f"{cmd[:3]} did not reach the target in {timeout} s")
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--nanogpt", default="https://github.com/karpathy/nanoGPT",
                    help="where to git clone nanoGPT from (its repository, or a local clone or mirror)")
    ap.add_argument("--config", default=str(REPO / "configs" / "shakespeare-char.yaml"))
    ap.add_argument("--target", type=float, default=1.886)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for our run (trying recipes)")
    ap.add_argument("--skip-nanogpt", action="store_true", help="time ours only (trying recipes)")
    ap.add_argument("--out", default="bench_out/time_to_quality.json")
    args = ap.parse_args()
    text = Path(args.text).resolve()
    work = Path(tempfile.mkdtemp(prefix="ttq_"))

    # nanoGPT, fetched and its data prepared from the same text
    nano = work / "nanogpt"
    subprocess.run(["git", "clone", "-q", args.nanogpt, str(nano)], check=True)
    shutil.copy(text, nano / "data" / "shakespeare_char" / "input.txt")  # prepare.py downloads only when missing
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "prepare.py"], cwd=nano / "data" / "shakespeare_char", check=True,
                   capture_output=True)
    nano_prep = time.perf_counter() - t0

    # ours
    sets = ["--set", f"data.source={text}", "--set", f"data.prepared_dir={work / 'data'}",
            "--set", f"run_dir={work / 'run'}"] + [x for o in args.overrides for x in ("--set", o)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmgen", "prepare", "--config", args.config, *sets], check=True,
                   capture_output=True)
    ours_prep = time.perf_counter() - t0
    metrics = work / "run" / "metrics.jsonl"

    def ours_hit(_lines):
        if not metrics.is_file():
            return None
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("val_loss") is not None and rec["val_loss"] <= args.target:
                return {"step": rec["step"], "val_loss": rec["val_loss"]}
        return None

    def nano_hit(lines):
        for line in lines:
            m = re.match(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", line)
            if m and float(m.group(3)) <= args.target:
                return {"step": int(m.group(1)), "val_loss": float(m.group(3))}
        return None

    ours_s, ours = watch([sys.executable, "-m", "llmgen", "pretrain", "--config", args.config, *sets], REPO,
                         ours_hit, args.timeout, work / "llmgen.log")
    print(f"llmgen: {ours_s:.1f} s to val {ours['val_loss']} at step {ours['step']}", flush=True)
    if args.skip_nanogpt:
        return
    nano_s, theirs = watch([sys.executable, "train.py", *NANOGPT_ARGS], nano, nano_hit, args.timeout,
                           work / "nanogpt.log")
    print(f"nanoGPT: {nano_s:.1f} s to val {theirs['val_loss']} at step {theirs['step']}", flush=True)
    rows = [dict(side="llmgen configs/shakespeare-char.yaml", seconds=round(ours_s, 1), **ours, prepare_s=round(ours_prep, 1)),
            dict(side="nanoGPT CPU recipe", seconds=round(nano_s, 1), **theirs, prepare_s=round(nano_prep, 1))]
    print(f"llmgen reaches {args.target} nats/char {nano_s / ours_s:.2f}x sooner than nanoGPT")
    report(args.out, dict(target=args.target, ratio=round(nano_s / ours_s, 2), rows=rows),
           ["run", "launch to val <= target (s)", "at step", "val loss", "data preparation (s, apart)"],
           [[r["side"], r["seconds"], r["step"], r["val_loss"], r["prepare_s"]] for r in rows])


if __name__ == "__main__":
    main()

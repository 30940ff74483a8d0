"""When the compiled decode step pays, from this machine's own timings, remembered between runs.

torch.compile makes each decode step cheaper (fused kernels, no per-op Python) but costs seconds to a
minute or two before the first token (much less once inductor's on-disk cache holds the graphs).
`generate.compile: auto` (the default) compiles when the decode steps ahead win that back:

    steps x (eager ms - compiled ms per step) >= compile seconds

with all three figures measured on this machine for this model and path, apart for short rows (up to
`scheduler.SHORT_ROW` slots: a fixed-shape graph) and long ones (a dynamic graph, slower per step, whose gain grows
with the length): every generation adds its mean one-row step time (eager or compiled) and, when it
compiled, the compile time to a small JSON record in the llmgen cache folder (`$LLMGEN_CACHE_DIR`,
else ~/.cache/llmgen). The first compile of a graph fills inductor's on-disk cache and costs several
times what the later ones do, so its time is not used as the cost. Until a class has been timed here
(both paths, and a compile after the first), work of `PRIOR_STEPS` decode steps or more is compiled (a
long generation, a file of prompts, a chat session) and shorter work is not (one short answer).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from llmgen.atomic import atomic_write_text
from llmgen.kernels.precision import cpu_name

PRIOR_STEPS = 2048  # before this machine has timed both paths: compile work of at least this many steps
MIN_STEPS = 8  # a generation adds its step time to the record only from this many one-row steps


def cache_dir() -> Path:
    return Path(os.environ.get("LLMGEN_CACHE_DIR") or Path.home() / ".cache" / "llmgen")


def _path() -> Path:
    return cache_dir() / "compile.json"


def _read() -> dict:
    try:
        record = json.loads(_path().read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def key(device: torch.device, dtype: torch.dtype, weights: str, shape: str) -> str:
    """What the timings depend on: torch, the machine, device, precision, the weights' kernel, the model's shape."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} x{torch.get_num_threads()}"
    return f"torch {torch.__version__} | {where} | {dtype} | {weights.split(' (')[0] or 'own weights'} | {shape}"


def pays_after(k: str, long: bool) -> Optional[int]:
    """Decode steps after which compiling pays here for rows of one length class (`long`: more than
    SHORT_ROW slots, a graph of their own), sys.maxsize if the compiled step measured no faster; None
    while this machine has not timed both paths and a compile of that class."""
    r = _read().get(k, {}).get("long" if long else "short", {})
    if not isinstance(r, dict) or not {"compile_s", "eager_ms", "compiled_ms"} <= r.keys():
        return None
    if r.get("compiles", 0) < 2:  # the first ran with inductor's cache cold (40 s where a warm one takes 6)
        return None
    gain = r["eager_ms"] - r["compiled_ms"]
    return math.ceil(r["compile_s"] * 1000 / gain) if gain > 0 else sys.maxsize


def note(k: str, long: bool, compiled: bool, steps: int, seconds: float, compile_s: float) -> None:
    """Record a generation's one-row decode steps (`steps` of them in `seconds`, compiled or eager) and the
    time it spent compiling, for its length class; the latest figures replace older ones. A record that
    cannot be written only costs the next run its estimate."""
    figures = {"compiled_ms" if compiled else "eager_ms": seconds / steps * 1000} if steps >= MIN_STEPS else {}
    if compile_s:
        figures["compile_s"] = compile_s
    if not figures:
        return
    record = _read()
    entry = record.get(k) if isinstance(record.get(k), dict) else {}
    cls = "long" if long else "short"
    old = entry.get(cls) if isinstance(entry.get(cls), dict) else {}
    entry[cls] = {**old, **{name: round(v, 4) for name, v in figures.items()}}
    if compile_s:
        entry[cls]["compiles"] = old.get("compiles", 0) + 1
    record[k] = entry
    try:
        _path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_path(), json.dumps(record, indent=1, sort_keys=True))
    except OSError:
        pass

"""When the compiled decode step pays, from this machine's own timings, remembered between runs.

torch.compile makes each decode step cheaper (fused kernels, no per-op Python) but costs seconds to a
minute or two before the first token (much less once inductor's on-disk cache holds the graphs).
`generate.compile: auto` (the default) compiles when the decode steps ahead win that back:

    steps x (eager ms - compiled ms per step) >= compile seconds

with all three figures measured on this machine for this model and path, apart for short rows (up to
`scheduler.SHORT_ROW` slots: a fixed-shape graph) and long ones (a dynamic graph): every
generation adds its mean one-row step time (eager or compiled) and, when it compiled, the compile
time to a small JSON record in the llmgen cache folder (`$LLMGEN_CACHE_DIR`,
else ~/.cache/llmgen). The first compile of a graph fills inductor's on-disk cache and costs several
times what the later ones do, so its time is not used as the cost. Before a compile has been timed
here, work that would take PRIOR_S seconds or more to decode eagerly compiles (a long generation, a
file of prompts, a chat session) and shorter work does not (one short answer); before anything has
been timed, the work runs eagerly (and times the eager step).
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

PRIOR_S = 60.0  # with only the eager step timed: compile work that would decode this long eagerly
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


def pays_after(k: str, long: bool) -> tuple[Optional[int], str]:
    """(decode steps after which compiling pays here, on what basis) for rows of one length class (`long`:
    more than SHORT_ROW slots, a graph of their own). Measured: compile seconds / (eager - compiled ms a
    step), sys.maxsize if the compiled step was no faster. With only the eager step timed: the steps of
    PRIOR_S of eager decoding. Nothing timed: None (decode eagerly; that run times it)."""
    entry = _read().get(k, {})
    classes = [entry.get(c, {}) if isinstance(entry, dict) else {} for c in (("long", "short") if long else ("short", "long"))]
    r = classes[0] if isinstance(classes[0], dict) else {}
    # the eager step costs about the same in either class (no graph): the other's timing stands in
    eager = r.get("eager_ms") or (classes[1].get("eager_ms") if isinstance(classes[1], dict) else None)
    if not eager:
        return None, "decoding eagerly until this machine has timed the step"
    # the first compile of a graph fills inductor's cache (40 s where a later one takes 6): not the cost
    if "compiled_ms" in r and "compile_s" in r and r.get("compiles", 0) >= 2:
        gain = eager - r["compiled_ms"]
        if gain <= 0:
            return sys.maxsize, "compiled measured no faster here"
        return math.ceil(r["compile_s"] * 1000 / gain), "measured here"
    return math.ceil(PRIOR_S * 1000 / eager), f"taken as {PRIOR_S:.0f} s of eager decoding until a compile is timed here"


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

"""Batch generation over a prompts file, writing one JSON line per prompt, resumable.

Input: `.jsonl` (objects with `prompt`, or `messages` for a chat, optional `id`) or `.txt` (one
prompt per line). Output: `.jsonl`, one object per prompt in input order. Prompts run with
continuous batching (`--batch-size` of them at once; a finished one's row goes to the next prompt
at once). When the output already holds results for the first prompts, they are kept and
generation continues after them; each result is appended as soon as every prompt before it is
written, so an interruption loses at most the prompts in flight and never truncates what was
written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from llmgen import ui
from llmgen.atomic import atomic_write_text
from llmgen.config import SamplingParams
from llmgen.data.chat_format import validate_messages
from llmgen.data.records import read_records
from llmgen.errors import LlmgenError
from llmgen.generate.engine import Engine


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Prompt rows of an --input-file: records with `prompt` (or chat `messages`), or a .txt with one
    prompt per line."""
    rows = []
    for obj, where in read_records(str(path), what="--input-file", txt_lines=True):
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
            raise LlmgenError(f"{where}: each record needs a `prompt` string (or `messages` for a chat)")
        if "messages" in obj:
            validate_messages(obj["messages"], where)
        rows.append(obj)
    if not rows:
        raise LlmgenError(f"--input-file {path} holds no prompts")
    return rows


def _done_results(out: Path) -> list[dict]:
    """Complete result lines already in the output file (a torn last line is dropped)."""
    if not out.is_file():
        return []
    good = []
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return good


def generate_file(engine: Engine, input_file: Path, output_file: Path, p: SamplingParams,
                  batch_size: int = 8, system: Optional[str] = None) -> tuple[int, int]:
    """Returns (prompts generated now, prompts that were already done)."""
    rows = read_prompts(input_file)
    output_file = Path(output_file)
    done = _done_results(output_file)
    if len(done) > len(rows) or any(d.get("index") != i for i, d in enumerate(done)):
        raise LlmgenError(f"--output-file {output_file} holds results that do not belong to {input_file}; choose "
                          f"another output file or delete it")
    for i, d in enumerate(done):  # each result must answer the prompt at its index
        want = {k: rows[i].get(k) for k in ("prompt", "messages", "id")}
        if any(k in d and d[k] != want[k] for k in want) or ("id" in rows[i]) != ("id" in d):
            raise LlmgenError(f"--output-file {output_file} line {i + 1} answers another prompt than {input_file} "
                              f"record {i + 1}; those results belong to another prompt file: choose another output "
                              f"file or delete it")
    if output_file.is_file():  # rewrite only if a torn line must go (atomically); else append
        lines = [json.dumps(d, ensure_ascii=False) for d in done]
        if output_file.read_text(encoding="utf-8") != "".join(x + "\n" for x in lines):
            atomic_write_text(output_file, "".join(x + "\n" for x in lines))
    else:
        output_file.parent.mkdir(parents=True, exist_ok=True)  # the file appears with the first results
    todo = list(range(len(done), len(rows)))
    if done:
        ui.info(f"{output_file} already holds {len(done)} of {len(rows)} results; continuing")
    with ui.progress("generate", len(todo), unit="prompts") as bar:
        prompts = [rows[i].get("messages") or rows[i]["prompt"] for i in todo]
        ready: dict[int, list] = {}
        t0, written = time.perf_counter(), 0
        each = engine.generate_each(prompts, p, system, max_batch=batch_size)
        for k, comps in each:
            ready[k] = comps
            lines = []
            while written in ready:  # results go out in input order
                i, comps = todo[written], ready.pop(written)
                rec = {"index": i, **({"id": rows[i]["id"]} if "id" in rows[i] else {}),
                       "prompt": rows[i].get("prompt"),
                       **({"messages": rows[i]["messages"]} if "messages" in rows[i] else {}),
                       "completions": [{"text": c.text, "finish_reason": c.finish_reason, "new_tokens": len(c.tokens),
                                        **({"score": c.score} if c.score is not None else {})} for c in comps],
                       "prompt_tokens": comps[0].prompt_tokens}
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                written += 1
            if lines:
                with open(output_file, "a", encoding="utf-8") as fh:  # whole lines only
                    fh.write("".join(lines))
                bar.advance(len(lines))
        ui.info(f"{len(todo)} prompt(s) in {time.perf_counter() - t0:.1f} s")
    return len(todo), len(done)

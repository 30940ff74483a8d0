"""Instruction and chat data: records -> messages -> token ids with a loss mask (rendered by a
`PromptFormat`, see chat_format.py).

The format is saved with a finetuned checkpoint, so `generate`, `chat` and `eval` prompt the
model the way it was trained and stop where it learned to stop.
"""

from __future__ import annotations

from typing import Any, Optional

from llmgen.data.chat_format import Messages, PromptFormat, validate_messages
from llmgen.data.records import read_records
from llmgen.errors import LlmgenError

FORMATS = ("text", "alpaca", "chat", "prompt_completion")


def encode_conversation(tok, fmt: PromptFormat, messages: Messages, train_on_prompt: bool = False
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it carries loss."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_response in fmt.segments(tok, messages):
        piece = tok.encode(text, specials=True)
        ids += piece
        mask += [is_response or train_on_prompt] * len(piece)
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Records from files, the hub and the built-in demo set


def _required(rec: dict, key: str, where: str, fmt: str) -> str:
    if not isinstance(rec, dict) or key not in rec:
        have = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
        raise LlmgenError(f"{where}: missing field `{key}` required by format `{fmt}` (found: {have}); fix the data "
                          f"or set the dataset's format")
    val = rec[key]
    if not isinstance(val, str):
        raise LlmgenError(f"{where}: field `{key}` must be a string, got {type(val).__name__}")
    return val


def record_to_conversations(rec: Any, fmt: str, where: str) -> list[Messages]:
    """One record in `fmt` -> its conversations (an Alpaca seed task with instances gives several)."""
    if fmt == "prompt_completion":
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        reply_key = "completion" if isinstance(rec, dict) and "completion" in rec else "reference"
        return [[{"role": "user", "content": _required(rec, "prompt", where, fmt) if prompt is None else prompt},
                 {"role": "assistant", "content": _required(rec, reply_key, where, fmt)}]]
    if fmt == "alpaca":
        instruction = _required(rec, "instruction", where, fmt)
        instances = rec.get("instances")
        if instances is None:
            instances = [{"input": rec.get("input", ""), "output": _required(rec, "output", where, fmt)}]
        out = []
        for inst in instances:
            inp = inst.get("input", "") or ""
            user = instruction + ("\n\n" + inp if inp.strip() else "")
            out.append([{"role": "user", "content": user},
                        {"role": "assistant", "content": _required(inst, "output", where, fmt)}])
        return out
    if fmt == "chat":
        if not isinstance(rec, dict) or "messages" not in rec:
            raise LlmgenError(f"{where}: missing field `messages` required by format `chat`")
        msgs = validate_messages(rec["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise LlmgenError(f"{where}: the conversation has no assistant message to learn from")
        return [msgs]
    raise LlmgenError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")


def load_conversations(source: str, fmt: str, seed: int = 1337, max_examples: Optional[int] = None,
                       split: str = "train") -> list[Messages]:
    out: list[Messages] = []
    for rec, where in read_records(source, seed=seed, split=split):
        out.extend(record_to_conversations(rec, fmt, where))
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise LlmgenError(f"dataset {source}: no examples found")
    return out[:max_examples] if max_examples else out


def prompt_reference_pairs(source: str, fmt: Optional[str] = None, max_examples: Optional[int] = None,
                           seed: int = 1337) -> list[tuple[Messages, list[str]]]:
    """Evaluation pairs: the conversation up to the last reply, and the reference reply (or several)."""
    pairs = []
    for rec, where in read_records(source, seed=seed, split="test" if source.startswith("hf:") else "train"):
        f = fmt or _guess_format(rec, where)
        if f == "prompt_completion" and isinstance(rec, dict) and isinstance(rec.get("reference"), list):
            refs = [str(r) for r in rec["reference"]]
            pairs.append(([{"role": "user", "content": _required(rec, "prompt", where, f)}], refs))
        else:
            for conv in record_to_conversations(rec, f, where):
                last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
                pairs.append((conv[:last], [conv[last]["content"]]))
        if max_examples and len(pairs) >= max_examples:
            return pairs[:max_examples]
    if not pairs:
        raise LlmgenError(f"{source}: no examples found (the file is empty)")
    return pairs


def _guess_format(rec: Any, where: str) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "chat"
        if "instruction" in rec:
            return "alpaca"
        if "prompt" in rec:
            return "prompt_completion"
    raise LlmgenError(f"{where}: cannot tell the format; each line needs `prompt` and `reference` (or `completion`), "
                      f"`instruction`/`output` (alpaca) or `messages` (chat)")

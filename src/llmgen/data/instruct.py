"""Instruction and chat data: records -> messages -> prompt text -> token ids with a loss mask.

A conversation is a list of `{"role", "content"}` messages. A `PromptFormat` renders it:
either with the tokenizer's own chat template (Jinja, as `transformers` does) or with a named
template (`alpaca`, `chatml`, `plain`) for bases that have none. Rendering yields segments
`(text, is_response)`, so the loss mask covers exactly the assistant replies (and the marker
that ends them, which is how the model learns where to stop).

The same format is saved with a finetuned checkpoint, so `generate`, `chat` and `eval` prompt
the model the way it was trained and stop where it learned to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

from llmgen.data.demo import iter_instructions
from llmgen.errors import LlmgenError
from llmgen.hub import require_hub

TEMPLATE_NAMES = ("alpaca", "chatml", "plain")
FORMATS = ("text", "alpaca", "chat", "prompt_completion")

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n")

Messages = list[dict[str, str]]


@lru_cache(maxsize=16)
def _jinja(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise LlmgenError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat_template(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to `messages` (the `apply_chat_template` contract)."""
    if not tokenizer.chat_template:
        raise LlmgenError("this model's tokenizer has no chat template; finetune it with finetune.template: "
                          "chatml (or alpaca/plain), or give prompts as plain text")
    specials = {k: v for k, v in tokenizer.extra_config.items() if k.endswith("_token")}
    return _jinja(tokenizer.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  eos_token=tokenizer.eos_token, **specials)


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are written: `chat_template` (the tokenizer's) or a named template."""

    name: str = "chat_template"

    @classmethod
    def choose(cls, tokenizer, template: Optional[str]) -> "PromptFormat":
        if template:
            return cls(template)
        return cls("chat_template" if tokenizer.chat_template else "plain")

    def segments(self, tok, messages: Messages) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_response) pieces; the prompt-only part when the
        conversation ends with a user turn (then the last piece opens the reply)."""
        validate_messages(messages)
        if self.name == "chat_template":
            return self._template_segments(tok, messages)
        out: list[tuple[str, bool]] = []
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if self.name == "chatml":
            for m in messages:
                if m["role"] == "assistant":
                    out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
                else:
                    out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            if messages[-1]["role"] != "assistant":
                out.append(("<|im_start|>assistant\n", False))
            return out
        for i, m in enumerate(turns):
            if m["role"] == "user":
                if self.name == "alpaca":
                    head = (ALPACA_HEADER if i == 0 else "\n\n") + (system[0] + "\n\n" if system and i == 0 else "")
                    out.append((f"{head}### Instruction:\n{m['content']}\n\n### Response:\n", False))
                else:  # plain
                    lead = system[0] + "\n" if system and i == 0 else ""
                    out.append((f"{lead}{m['content']}\n", False))
            else:
                out.append((m["content"] + tok.eos_token, True))
        return out

    def _template_segments(self, tok, messages: Messages) -> list[tuple[str, bool]]:
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = render_chat_template(tok, messages[:i], add_generation_prompt=True)
            full = render_chat_template(tok, messages[:i + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise LlmgenError("the tokenizer's chat template does not render conversations incrementally, so "
                                  "replies cannot be masked; set finetune.template: chatml")
            out.append((prefix[len(done):], False))
            out.append((full[len(prefix):], True))
            done = full
        if messages[-1]["role"] != "assistant":
            prefix = render_chat_template(tok, messages, add_generation_prompt=True)
            out.append((prefix[len(done):], False))
        return out

    def prompt(self, tok, messages: Messages) -> str:
        """The text to feed the model so that it writes the next assistant reply."""
        return "".join(text for text, _ in self.segments(tok, messages))

    def stops(self, tok) -> list[str]:
        """Strings that end a reply in this format (besides the EOS token)."""
        if self.name == "chatml":
            return ["<|im_end|>"]
        if self.name != "chat_template":
            return [tok.eos_token]
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\x00ANSWER\x00"}]
        reply = self._template_segments(tok, probe)[1][0]
        tail = reply.split("\x00ANSWER\x00", 1)[-1].strip()
        return [tail] if tail else [tok.eos_token]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}


def validate_messages(messages: Any, where: str = "conversation") -> Messages:
    if not isinstance(messages, list) or not messages:
        raise LlmgenError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlmgenError(f"{where}: every message needs `role` and `content` (got {str(m)[:80]})")
        if m["role"] not in ("system", "user", "assistant"):
            raise LlmgenError(f"{where}: unknown role {m['role']!r}; use system, user or assistant")
    return messages


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


def iter_records(source: str, seed: int = 1337, n_builtin: int = 2000, split: str = "train",
                 text_field: str = "text") -> Iterator[tuple[Any, str]]:
    """(record, where) pairs from a .jsonl/.json/.parquet/.csv file, `hf:<name>` or `builtin:instructions`."""
    if source.startswith("builtin:instructions"):
        part = "eval" if source.endswith(":eval") else "train"
        for i, rec in enumerate(iter_instructions(n_builtin if part == "train" else 200, seed, part)):
            yield rec, f"{source}#{i}"
        return
    if source.startswith("hf:"):
        require_hub(source)
        import datasets

        name, _, config = source[3:].partition(":")
        for i, rec in enumerate(datasets.load_dataset(name, config or None, split=split, streaming=True)):
            yield rec, f"{source}#{i}"
        return
    path = Path(source)
    if not path.is_file():
        raise LlmgenError(f"dataset {source}: file not found; give a .jsonl/.json/.parquet/.csv file, hf:<name> "
                          f"or builtin:instructions")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{n}"
                except json.JSONDecodeError as e:
                    raise LlmgenError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LlmgenError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        for i, rec in enumerate(data):
            yield rec, f"{path}[{i}]"
    elif path.suffix in (".parquet", ".csv"):
        import datasets

        ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        for i, rec in enumerate(ds):
            yield rec, f"{path} row {i + 1}"
    elif path.suffix == ".txt":
        yield {text_field: path.read_text(encoding="utf-8")}, str(path)
    else:
        raise LlmgenError(f"dataset {source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, "
                          f".csv or .txt")


def load_conversations(source: str, fmt: str, seed: int = 1337, max_examples: Optional[int] = None,
                       split: str = "train") -> list[Messages]:
    out: list[Messages] = []
    for rec, where in iter_records(source, seed, split=split):
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
    for rec, where in iter_records(source, seed, split="test" if source.startswith("hf:") else "train"):
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


# Jinja versions of the named templates, written into exported tokenizers so that transformers'
# apply_chat_template prompts an exported model exactly as llmgen does.
NAMED_JINJA = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ m['content'] + '\\n' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if loop.first %}{{ '" + ALPACA_HEADER.replace("\n", "\\n") + "' }}{% else %}{{ '\\n\\n' }}{% endif %}"
        "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
}

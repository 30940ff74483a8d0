"""How conversations become prompt text: chat templates, ChatML / alpaca / plain, defined once.

A conversation is a list of `{"role", "content"}` messages. A `PromptFormat` renders it either with
the tokenizer's own chat template (Jinja, as `transformers` does) or with a named template for bases
that have none. Each named template is one Jinja string below: the same text renders llmgen's prompts,
becomes the chat template of the tokenizers llmgen trains (ChatML), and is written into exported
tokenizers, so `transformers`' apply_chat_template prompts an exported model exactly as llmgen does.

Rendering yields segments `(text, is_response)`, found by rendering the conversation one reply at a
time, so the loss mask covers exactly the assistant replies and the marker that ends them (which is
how the model learns where to stop). Templates run in Jinja's immutable sandbox: they never run code.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmgen.errors import LlmgenError

Messages = list[dict[str, str]]

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")

# The named templates. ChatML is also the chat template of every tokenizer llmgen trains.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_SYSTEM = "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
_TURNS = "{% for m in messages | rejectattr('role', 'equalto', 'system') %}"
ALPACA = (
    _SYSTEM + _TURNS + "{% if m['role'] == 'user' %}"
    "{% if loop.first %}{{ '" + ALPACA_HEADER.replace("\n", "\\n") + "' }}"
    "{% if system %}{{ system[0]['content'] + '\\n\\n' }}{% endif %}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PLAIN = (
    _SYSTEM + _TURNS + "{% if m['role'] == 'user' %}"
    "{% if loop.first and system %}{{ system[0]['content'] + '\\n' }}{% endif %}{{ m['content'] + '\\n' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA, "plain": PLAIN}


def validate_messages(messages: Any, where: str = "conversation") -> Messages:
    if not isinstance(messages, list) or not messages:
        raise LlmgenError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlmgenError(f"{where}: every message needs `role` and `content` (got {str(m)[:80]})")
        if m["role"] not in ("system", "user", "assistant"):
            raise LlmgenError(f"{where}: unknown role {m['role']!r}; use system, user or assistant")
    return messages


@lru_cache(maxsize=16)
def _jinja(source: str):
    def raise_exception(message):
        raise LlmgenError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat_template(tokenizer, messages: Messages, add_generation_prompt: bool,
                         source: Optional[str] = None) -> str:
    """A chat template (the tokenizer's, or `source`) applied to `messages` (the `apply_chat_template`
    contract)."""
    source = source or tokenizer.chat_template
    if not source:
        raise LlmgenError("this model's tokenizer has no chat template; finetune it with finetune.template: "
                          "chatml (or alpaca/plain), or give prompts as plain text")
    specials = {k: v for k, v in tokenizer.extra_config.items() if k.endswith("_token")}
    try:
        return _jinja(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     eos_token=tokenizer.eos_token, **specials)
    except SecurityError as e:
        raise LlmgenError(f"the chat template was stopped: it tried something the sandbox refuses ({e}); templates "
                          f"may only format messages, so use a template that does") from None
    except TemplateError as e:
        raise LlmgenError(f"the chat template failed ({type(e).__name__}: {e}); fix the template or use "
                          f"finetune.template: chatml") from None


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are written: `chat_template` (the tokenizer's) or a named template."""

    name: str = "chat_template"

    @classmethod
    def choose(cls, tokenizer, template: Optional[str]) -> "PromptFormat":
        if template:
            return cls(template)
        return cls("chat_template" if tokenizer.chat_template else "plain")

    def jinja(self, tok) -> Optional[str]:
        """The Jinja source this format renders with."""
        return tok.chat_template if self.name == "chat_template" else NAMED_TEMPLATES[self.name]

    def _render(self, tok, messages: Messages, add_generation_prompt: bool) -> str:
        return render_chat_template(tok, messages, add_generation_prompt, self.jinja(tok))

    def segments(self, tok, messages: Messages) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_response) pieces; the prompt-only part when the
        conversation ends with a user turn (then the last piece opens the reply)."""
        validate_messages(messages)
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(tok, messages[:i], add_generation_prompt=True)
            full = self._render(tok, messages[:i + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise LlmgenError("the tokenizer's chat template does not render conversations incrementally, so "
                                  "replies cannot be masked; set finetune.template: chatml")
            reply, after = full[len(prefix):], ""
            if self.name != "chat_template":  # a named template trains up to its end marker, not past it
                stop = self.stops(tok)[0]
                cut = reply.rfind(stop) + len(stop) if stop in reply else len(reply)
                reply, after = reply[:cut], reply[cut:]
            out += [(prefix[len(done):], False), (reply, True)] + ([(after, False)] if after else [])
            done = full
        if messages[-1]["role"] != "assistant":
            out.append((self._render(tok, messages, add_generation_prompt=True)[len(done):], False))
        return [(text, is_reply) for text, is_reply in out if text]

    def prompt(self, tok, messages: Messages) -> str:
        """The text to feed the model so that it writes the next assistant reply."""
        return "".join(text for text, _ in self.segments(tok, messages))

    def stops(self, tok) -> list[str]:
        """Strings that end a reply in this format (besides the EOS token): what the template writes
        after a reply's text."""
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\x00ANSWER\x00"}]
        full = self._render(tok, probe, add_generation_prompt=False)
        tail = full.split("\x00ANSWER\x00", 1)[-1].strip()
        return [tail] if tail else [tok.eos_token]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}

"""Multi-turn chat on top of the engine: history, system prompt, trimming to the context window.

The REPL reads lines through `read` and writes through `write`, so it is testable and the CLI
only wires it to the terminal. Commands: /reset, /save FILE, /exit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

from llmgen.atomic import atomic_write_text
from llmgen.config import SamplingParams
from llmgen.data.chat_format import Messages, PromptFormat
from llmgen.errors import LlmgenError
from llmgen.generate.engine import Engine

HELP = "commands: /reset (forget the conversation), /save FILE (write it as JSON), /exit"


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: Optional[str] = None):
        if engine.fmt is None and not engine.tok.chat_template:
            raise LlmgenError(f"the model {engine.source} has no chat template and was not instruction-finetuned, "
                              f"so it cannot chat; finetune it (`llmgen finetune`, which saves a prompt format) or "
                              f"use `llmgen generate` for plain completion")
        self.fmt = engine.fmt or PromptFormat("chat_template")  # how the engine renders message lists
        self.engine, self.params, self.system = engine, params, system
        self.history: Messages = []

    def messages(self) -> Messages:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _fit(self) -> None:
        """Drop the oldest exchanges until the prompt leaves room for a reply in the context."""
        budget = self.engine.cfg.max_seq_len - min(self.params.max_new_tokens, self.engine.cfg.max_seq_len // 2)
        while True:
            n = len(self.engine.tok.encode(self.fmt.prompt(self.engine.tok, self.messages()), specials=True))
            if n <= budget or len(self.history) <= 1:
                return
            self.history = self.history[2:] if len(self.history) > 2 else self.history[-1:]

    def reply(self, user: str) -> Iterator[str]:
        self.history.append({"role": "user", "content": user})
        self._fit()
        p = self.params
        pieces = []
        for piece in self.engine.stream(self.messages(), p, session=True):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces)})

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False) + "\n")


def repl(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    write(f"chatting with {session.engine.source}; {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.history = []
            write("(conversation cleared)\n")
            continue
        if text.startswith("/save"):
            target = text[5:].strip()
            if not target:
                write("usage: /save FILE\n")
                continue
            session.save(Path(target))
            write(f"(saved to {target})\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        write("bot> ")
        for piece in session.reply(text):
            write(piece)
        write("\n")

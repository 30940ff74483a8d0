"""Tokenizers: train a byte-level BPE, build a bytes tokenizer, or load a pretrained one.

Every tokenizer is a `tokenizers.Tokenizer` saved as `tokenizer.json` plus a
`tokenizer_config.json` (special tokens, chat template), so `transformers.AutoTokenizer`
loads the folder with no custom code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmgen.data.chat_format import CHATML
from llmgen.errors import LlmgenError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END]

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` with the facts the rest of llmgen needs (EOT id, chat template)."""

    def __init__(self, tok: HFTokenizer, chat_template: Optional[str] = CHATML,
                 eos_token: str = EOT, pad_token: Optional[str] = PAD, kind: str = "bpe",
                 extra_config: Optional[dict] = None):
        self.tok = tok
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.kind = kind
        self.extra_config = extra_config or {}
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise LlmgenError(f"tokenizer has no end-of-text token {eos_token!r}")
        self.eot_id: int = eos_id
        self.pad_id: Optional[int] = tok.token_to_id(pad_token) if pad_token else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Token ids of text. Special-token strings inside it are plain text unless `specials` is
        set (templated prompts such as ChatML), in which case they become their control tokens."""
        if specials:
            ids: list[int] = []
            for i, part in enumerate(self._special_re().split(text)):
                if i % 2:
                    ids.append(self.tok.token_to_id(part))
                elif part:
                    ids.extend(self.encode(part))
            return ids
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        with self._specials_as_text():
            return self.tok.encode(text, add_special_tokens=False).ids

    def _special_re(self) -> "re.Pattern":
        if getattr(self, "_specials_pattern", None) is None:
            names = sorted((t.content for t in self.tok.get_added_tokens_decoder().values() if t.special),
                           key=len, reverse=True)
            self._specials_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "(?!)")
        return self._specials_pattern

    @property
    def cuts_safely(self) -> bool:
        """Whether text cut where `sources.split_safely` cuts (whitespace after a visible character)
        encodes to the same ids as the whole: true for a GPT-2-style byte-level BPE (ours, GPT-2's),
        whose pre-tokenizer splits there anyway; false for anything that normalises or adds prefix
        spaces (SentencePiece-style tokenizers), so those are encoded whole."""
        pre = self.tok.pre_tokenizer
        if self.kind == "bytes" or self.tok.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel):
            return False
        added = (t.content for t in self.tok.get_added_tokens_decoder().values() if not t.special)
        return pre.use_regex and not pre.add_prefix_space and not any(re.search(r"\s", a) for a in added)

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts at once (in parallel, on all cores, for BPE)."""
        if self.kind == "bytes":
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        with self._specials_as_text():  # the _fast variant skips character offsets: same ids, less work
            encoded = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    @contextlib.contextmanager
    def _specials_as_text(self):
        # Data may contain "<|endoftext|>" literally; it must not become the control token.
        self.tok.encode_special_tokens = True
        try:
            yield
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "llmgen_kind": self.kind,
            **self.extra_config,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        """From a folder with tokenizer.json (+ tokenizer_config.json) or a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LlmgenError(f"no tokenizer.json at {path}; give a tokenizer.json file or a folder holding one")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise LlmgenError(f"{file}: not a valid tokenizers file ({str(e)[:200]})") from None
        config = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LlmgenError(f"{cfg_file}: not valid JSON ({e}); the tokenizer files are damaged") from None
        eos = _token_str(config.get("eos_token")) or _guess_eos(tok)
        pad = _token_str(config.get("pad_token"))
        if pad is not None and tok.token_to_id(pad) is None:
            pad = None
        kind = config.pop("llmgen_kind", "pretrained")
        known = {"tokenizer_class", "eos_token", "pad_token", "clean_up_tokenization_spaces", "chat_template"}
        extra = {k: v for k, v in config.items() if k not in known and k in ("bos_token", "unk_token")}
        return cls(tok, config.get("chat_template"), eos, pad, kind, extra)


def _token_str(value) -> Optional[str]:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def _guess_eos(tok: HFTokenizer) -> str:
    for cand in (EOT, "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>"):
        if tok.token_to_id(cand) is not None:
            return cand
    raise LlmgenError("the tokenizer names no eos_token and has none of the usual ones; add tokenizer_config.json "
                      "with an eos_token")


def _byte_level(tok: HFTokenizer, use_regex: bool) -> None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with our special tokens."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise LlmgenError(f"tokenizer.vocab_size = {vocab_size} is smaller than the byte alphabet plus special "
                          f"tokens ({floor}); use at least {floor}, or tokenizer.type: bytes")
    tok = HFTokenizer(models.BPE())
    _byte_level(tok, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, kind="bpe")


def bytes_tokenizer() -> Tokenizer:
    """One token per byte (id = byte value), then the special tokens from 256."""
    table = byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for i, s in enumerate(SPECIAL_TOKENS):
        vocab[s] = 256 + i
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level(tok, use_regex=False)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(tok, kind="bytes")

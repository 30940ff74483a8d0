"""Where text comes from: files, folders, globs, HF hub datasets and the built-in demo corpus.

`Corpus(cfg.data).documents()` yields `Document`s. A document is an iterable of text pieces,
so a single huge text file (one document) streams through in chunks with flat memory. Pieces
of one document are cut only where byte-level BPE would split anyway (before a space or after
a lone newline between two non-blank characters), so chunking never changes the tokens.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llmgen.config import DataConfig
from llmgen.data import demo
from llmgen.errors import LlmgenError
from llmgen.data.records import field, read_records

FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
CHUNK_BYTES = 4 << 20
BUILTINS = ("builtin:stories", "builtin:instructions", "builtin:instructions:eval")


@dataclass
class Document:
    pieces: Iterable[str]  # the text, in order; concatenated they are the document
    nbytes: Optional[int] = None  # size when known up front (a whole file)


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n") if "\r" in text else text


# ----------------------------------------------------------------------------------------------
# Plain text files


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def _safe_cut(text: str) -> int:
    """Index of the last place where text can be cut without changing BPE pre-tokens (0 = none)."""
    start = max(0, len(text) - 4096)  # a cut is almost always in the last few lines
    while True:
        last = 0
        for m in _SAFE_CUT.finditer(text, start):
            last = m.start()
        if last or start == 0:
            return last
        start = max(0, start - (1 << 20))


def split_safely(text: str, size: int) -> list[str]:
    """Cut text into parts of about `size` characters at places that do not change byte-level BPE
    pre-tokens, so encoding the parts gives the same ids as encoding the whole."""
    parts, pos = [], 0
    while len(text) - pos > size:
        cut = _safe_cut(text[pos:pos + size])
        if not cut:
            break
        parts.append(text[pos:pos + cut])
        pos += cut
    parts.append(text[pos:])
    return parts


def _decoded_chunks(path: Path, errors: str) -> Iterator[str]:
    """Decode a file in chunks; report invalid UTF-8 with its byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(CHUNK_BYTES)
            final = not raw
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise LlmgenError(f"{path}: invalid UTF-8 at byte offset {at}; fix the file or set "
                                  f"data.on_decode_error: replace") from None
            offset += len(raw)
            if text:
                yield text
            if final:
                return


def text_file_pieces(path: Path, errors: str = "strict") -> Iterator[str]:
    """A text file as normalised pieces of a few MB, cut at tokenisation-safe places."""
    buf = ""
    for text in _decoded_chunks(path, errors):
        if buf.endswith("\r"):
            text, buf = buf[-1] + text, buf[:-1]
        buf = _normalise(buf + text)
        if len(buf) >= CHUNK_BYTES:
            cut = _safe_cut(buf[:-1])  # keep the last char: a CR/LF pair may continue
            if cut:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield _normalise(buf)


def split_on(pieces: Iterable[str], sep: str) -> Iterator[str]:
    """Cut a stream of pieces into documents at `sep`."""
    buf = ""
    for piece in pieces:
        buf += piece
        if sep in buf:
            *docs, buf = buf.split(sep)
            yield from docs
    yield buf


# ----------------------------------------------------------------------------------------------
# Structured files


_TEXT_FIX = "set data.text_field to the field that holds the text"


def record_texts(source: str, c: DataConfig, errors: str = "strict") -> Iterator[str]:
    """The `data.text_field` of every record of a .jsonl/.json/.csv/.parquet file or hf: dataset."""
    for rec, where in read_records(source, what="data.source", errors=errors, split=c.split, streaming=c.streaming):
        yield field(rec, c.text_field, where, _TEXT_FIX)


# ----------------------------------------------------------------------------------------------
# The corpus


class Corpus:
    """All documents named by `data.source`, in a fixed order."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        specs = [cfg.source] if isinstance(cfg.source, str) else list(cfg.source)
        if not specs:
            raise LlmgenError("data.source is empty; name a file, folder, glob, hf:<dataset> or builtin:stories")
        self.entries: list[tuple[str, object]] = []  # (kind, payload)
        for spec in specs:
            self.entries.extend(self._resolve(spec))

    @staticmethod
    def _resolve(spec: str) -> list[tuple[str, object]]:
        if spec.startswith("builtin:"):
            if spec not in BUILTINS:
                raise LlmgenError(f"data.source {spec!r} is not a built-in corpus; choose one of {', '.join(BUILTINS)}")
            return [("builtin", spec)]
        if spec.startswith("hf:"):
            return [("hf", spec[3:])]
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES)
            if not files:
                raise LlmgenError(f"data.source {spec}: folder holds no {'/'.join(FILE_TYPES)} files")
            return [("file", p) for p in files]
        if any(ch in spec for ch in "*?["):
            files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
            files = [p for p in files if p.is_file()]
            if not files:
                raise LlmgenError(f"data.source {spec}: the pattern matches no files")
            return [("file", p) for p in files]
        if not path.exists():
            raise LlmgenError(f"data.source {spec}: file not found; give a path to a .txt/.jsonl/.json/.parquet/"
                              f".csv file, a folder, a glob, hf:<dataset> or builtin:stories")
        if path.suffix.lower() not in FILE_TYPES:
            raise LlmgenError(f"data.source {spec}: unsupported file type {path.suffix!r}; supported: "
                              f"{', '.join(FILE_TYPES)}")
        return [("file", path)]

    def describe(self) -> str:
        parts = []
        for kind, payload in self.entries[:5]:
            parts.append(str(payload) if kind != "hf" else f"hf:{payload}")
        more = f" and {len(self.entries) - 5} more" if len(self.entries) > 5 else ""
        return ", ".join(parts) + more

    def fingerprint(self) -> str:
        """Changes when an input file changes (path, size, mtime) or the reading options do."""
        h = hashlib.sha256()
        c = self.cfg
        h.update(repr((c.text_field, c.separator, c.split, c.on_decode_error, c.max_documents,
                       c.builtin_documents, c.seed)).encode())
        for kind, payload in self.entries:
            h.update(f"{kind}:{payload}".encode())
            if kind == "file":
                st = Path(payload).stat()
                h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def total_bytes(self) -> Optional[int]:
        """Bytes of input when known (files only), for progress and ETA."""
        if all(kind == "file" for kind, _ in self.entries):
            return sum(Path(p).stat().st_size for _, p in self.entries)
        return None

    def documents(self) -> Iterator[Document]:
        n = 0
        limit = self.cfg.max_documents
        for kind, payload in self.entries:
            for doc in self._entry_documents(kind, payload):
                yield doc
                n += 1
                if limit is not None and n >= limit:
                    return

    def _entry_documents(self, kind: str, payload) -> Iterator[Document]:
        c = self.cfg
        errors = "strict" if c.on_decode_error == "error" else "replace"
        if kind == "builtin":
            if payload == "builtin:stories":
                texts = demo.iter_stories(c.builtin_documents, c.seed)
            else:
                split = "eval" if payload.endswith(":eval") else "train"
                texts = (r["prompt"] + "\n" + r["completion"]
                         for r in demo.iter_instructions(c.builtin_documents, c.seed, split))
            for t in texts:
                yield Document([t])
            return
        if kind == "hf":
            for t in record_texts(f"hf:{payload}", c):
                t = _normalise(t)
                if t.strip():
                    yield Document([t])
            return
        path = Path(payload)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if c.separator is None:
                yield Document(text_file_pieces(path, errors), nbytes=path.stat().st_size)
                return
            for t in split_on(text_file_pieces(path, errors), c.separator):
                if t.strip():
                    yield Document([t.strip("\n")])
            return
        for t in record_texts(str(path), c, errors):
            t = _normalise(t)
            if t.strip():
                yield Document([t])

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
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llmgen.config import DataConfig
from llmgen.data import demo
from llmgen.errors import LlmgenError
from llmgen.hub import require_hub

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


def _jsonl_texts(path: Path, field: str, errors: str) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise LlmgenError(f"{path}: line {lineno}: invalid UTF-8 at byte {e.start} of the line; fix it "
                                  f"or set data.on_decode_error: replace") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmgenError(f"{path}: line {lineno} is not valid JSON ({e.msg}); each line must be "
                                  f"one JSON object") from None
            yield _field(obj, field, f"{path}: line {lineno}")


def _field(obj, field: str, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise LlmgenError(f"{where}: no text field {field!r} (found: {keys}); set data.text_field to the "
                          f"field that holds the text")
    value = obj[field]
    if not isinstance(value, str):
        raise LlmgenError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _json_texts(path: Path, field: str) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LlmgenError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise LlmgenError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LlmgenError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise LlmgenError(f"{path}: expected a JSON list of records")
    for i, obj in enumerate(data):
        yield _field(obj, field, f"{path}: record {i}")


def _table_texts(path: Path, field: str) -> Iterator[str]:
    import datasets

    kind = path.suffix.lstrip(".")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        for i, row in enumerate(ds):
            yield _field(row, field, f"{path}: row {i}")
    except LlmgenError:
        raise
    except Exception as e:  # pyarrow/pandas parse errors
        raise LlmgenError(f"{path}: cannot be read as {kind}: {str(e).splitlines()[0][:200]}") from None


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
            for t in _hub_texts(str(payload), c):
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
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, c.text_field, errors)
        elif suffix == ".json":
            texts = _json_texts(path, c.text_field)
        else:
            texts = _table_texts(path, c.text_field)
        for t in texts:
            t = _normalise(t)
            if t.strip():
                yield Document([t])


def _hub_texts(name: str, c: DataConfig) -> Iterator[str]:
    """Texts of an HF hub dataset `name[:config]` through `datasets.load_dataset`."""
    import datasets

    require_hub(f"data.source hf:{name}")
    repo, _, subset = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, subset or None, split=c.split, streaming=c.streaming)
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LlmgenError(f"data.source hf:{name}: could not load it from the Hugging Face hub ({reason}); this "
                          f"source needs network access, or point data.source at a local copy") from None
    for i, row in enumerate(ds):
        yield _field(row, c.text_field, f"hf:{name} row {i}")

"""`llmgen prepare`: sources -> tokenizer -> train.bin / val.bin / meta.json, atomically.

The pipeline streams: documents are read in pieces, encoded in parallel batches by the Rust
tokenizer, and appended to the shard files, so memory does not grow with the corpus. The
output is built in a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np

from llmgen import ui
from llmgen.version import __version__
from llmgen.atomic import atomic_dir, exclusive
from llmgen.config import Config
from llmgen.data.shards import FORMAT_VERSION, ShardWriter, shard_dtype, write_meta
from llmgen.data.sources import _SAFE_CUT, Corpus, Document, split_safely
from llmgen.data.tokenizer import Tokenizer, bytes_tokenizer, train_bpe
from llmgen.errors import LlmgenError

BATCH_CHARS = 2 << 20  # text per encode_batch call
PART_CHARS = 1 << 17  # ...cut into parts of this size, so every core gets many small tasks
TRAIN_PART_CHARS = 1 << 14  # BPE training reads the text in parts of this size (a 4 MB piece peaked ~1 GB)


@dataclass
class PrepareResult:
    folder: Path
    meta: dict
    up_to_date: bool
    seconds: float


def _fingerprint(cfg: Config, corpus: Corpus) -> str:
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}".encode())
    h.update(corpus.fingerprint().encode())
    d, t = cfg.data, cfg.tokenizer
    h.update(repr((d.val_fraction, t.type, t.vocab_size, t.min_frequency, t.train_max_bytes)).encode())
    if t.type == "pretrained" and t.path:
        p = Path(t.path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _build_tokenizer(cfg: Config, corpus: Corpus) -> Tokenizer:
    t = cfg.tokenizer
    if t.type == "bytes":
        return bytes_tokenizer()
    if t.type == "pretrained":
        if not t.path:
            raise LlmgenError("tokenizer.type is pretrained but tokenizer.path is not set; point it at a "
                              "tokenizer.json or an HF tokenizer folder")
        return Tokenizer.load(Path(t.path))
    budget = t.train_max_bytes
    total = corpus.total_bytes()

    def texts() -> Iterator[str]:
        seen = 0
        with ui.progress("training tokenizer", min(total, budget) if total else budget) as bar:
            for doc in corpus.documents():
                for piece in doc.pieces:
                    n = len(piece.encode("utf-8"))
                    yield from split_safely(piece, TRAIN_PART_CHARS)  # small items keep the trainer's memory low
                    bar.advance(n)
                    seen += n
                    if seen >= budget:
                        return

    tok = train_bpe(texts(), t.vocab_size, t.min_frequency)
    if tok.vocab_size < t.vocab_size:
        ui.info(f"note: the corpus supports only {tok.vocab_size} BPE tokens (asked for {t.vocab_size})")
    return tok


def _position_split(doc: Document, val_fraction: float) -> Iterator[tuple[str, str]]:
    """Split one long document by position: its last `val_fraction` of bytes go to validation."""
    pieces = doc.pieces if doc.nbytes is not None else list(doc.pieces)
    total = doc.nbytes if doc.nbytes is not None else sum(len(p.encode("utf-8")) for p in pieces)
    target = int(total * (1.0 - val_fraction))
    if val_fraction <= 0:
        yield from (("train", p) for p in pieces)
        return
    seen, in_val = 0, False
    for piece in pieces:
        if in_val:
            yield "val", piece
            continue
        nb = len(piece.encode("utf-8"))
        if seen + nb <= target:
            seen += nb
            yield "train", piece
            continue
        k = int(len(piece) * (target - seen) / max(nb, 1))  # exact for ASCII, proportional otherwise
        m = _SAFE_CUT.search(piece, k)
        cut = m.start() if m else k
        if piece[:cut]:
            yield "train", piece[:cut]
        if piece[cut:]:
            yield "val", piece[cut:]
        in_val = True


def _is_val(index: int, val_fraction: float) -> bool:
    """Systematic split by document: document 0, then every (1/val_fraction)-th, goes to validation.

    Exact fractions, no randomness, streamable, and never an empty validation split."""
    if val_fraction <= 0:
        return False
    offset = 1.0 - val_fraction
    return int((index + 1) * val_fraction + offset) > int(index * val_fraction + offset)


def _tagged_pieces(corpus: Corpus, val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    """(split, text piece, ends a document) for the whole corpus."""
    docs = corpus.documents()
    first = next(docs, None)
    if first is None:
        return
    second = next(docs, None)
    if second is None:  # one long document (a novel, tinyshakespeare): split by position
        prev = None
        for split, piece in _position_split(first, val_fraction):
            if prev is not None:
                yield prev[0], prev[1], prev[0] != split
            prev = (split, piece)
        if prev is not None:
            yield prev[0], prev[1], True
        return
    for index, doc in enumerate(chain([first, second], docs)):
        split = "val" if _is_val(index, val_fraction) else "train"
        prev = None
        for piece in doc.pieces:
            if prev is not None:
                yield split, prev, False
            prev = piece
        if prev is not None:
            yield split, prev, True


def prepare(cfg: Config, force: bool = False) -> PrepareResult:
    """Tokenize `cfg.data.source` into `cfg.data.prepared_dir`; a no-op when already up to date. The
    folder is locked while it is prepared: a second prepare of it waits for nothing and says so."""
    with exclusive(Path(cfg.data.prepared_dir), "data.prepared_dir"):
        return _prepare(cfg, force)


def _prepare(cfg: Config, force: bool) -> PrepareResult:
    t0 = time.time()
    corpus = Corpus(cfg.data)
    folder = Path(cfg.data.prepared_dir)
    fingerprint = _fingerprint(cfg, corpus)
    meta_file = folder / "meta.json"
    if not force and meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") == fingerprint:
            return PrepareResult(folder, old, True, time.time() - t0)

    with atomic_dir(folder) as tmp:
        tok = _build_tokenizer(cfg, corpus)
        tok.save(tmp)
        dtype = shard_dtype(tok.vocab_size)
        writers = {s: ShardWriter(tmp / f"{s}.bin", dtype) for s in ("train", "val")}
        eot = np.array([tok.eot_id])
        total = corpus.total_bytes()
        blank = True  # no visible text seen yet

        def encode(batch: list[tuple[str, str, bool]]) -> tuple[list, list[np.ndarray]]:
            texts = [text for _, text, _ in batch]
            if not tok.cuts_safely:
                return batch, tok.encode_batch(texts)
            parts = [split_safely(t, PART_CHARS) for t in texts]  # parts encode exactly like the whole
            flat = tok.encode_batch([x for ps in parts for x in ps])
            encoded, at = [], 0
            for ps in parts:
                encoded.append(np.concatenate(flat[at:at + len(ps)]) if len(ps) > 1 else flat[at])
                at += len(ps)
            return batch, encoded

        def write(batch: list[tuple[str, str, bool]], encoded: list[np.ndarray]) -> None:
            nonlocal blank
            blank = blank and all(not text.strip() for _, text, _ in batch)
            for (split, text, end), ids in zip(batch, encoded):
                w = writers[split]
                w.write(ids)
                nbytes = len(text.encode("utf-8"))
                w.bytes += nbytes
                bar.advance(nbytes)
                if end:
                    w.write(eot)
                    w.documents += 1

        # One batch encodes (on every core, outside the GIL) while this thread reads the next and
        # writes the previous one, in order.
        with ui.progress("encoding", total) as bar, ThreadPoolExecutor(1) as pool:
            batch: list[tuple[str, str, bool]] = []
            chars, pending = 0, None
            for item in _tagged_pieces(corpus, cfg.data.val_fraction):
                batch.append(item)
                chars += len(item[1])
                if chars >= BATCH_CHARS or len(batch) >= 4096:
                    job = pool.submit(encode, batch)
                    if pending is not None:
                        write(*pending.result())
                    pending, batch, chars = job, [], 0
            if pending is not None:
                write(*pending.result())
            if batch:
                write(*encode(batch))
        for w in writers.values():
            w.close()
        tr, va = writers["train"], writers["val"]
        if blank or tr.documents == 0:
            raise LlmgenError(f"data.source {corpus.describe()}: the corpus is empty (no text found); check the "
                              f"path, data.text_field and data.separator")
        meta = {
            "format_version": FORMAT_VERSION,
            "llmgen_version": __version__,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "tokenizer_type": cfg.tokenizer.type,
            "tokenizer_sha256": tok.sha256(),
            "train_tokens": tr.tokens, "val_tokens": va.tokens,
            "train_bytes": tr.bytes, "val_bytes": va.bytes,
            "train_documents": tr.documents, "val_documents": va.documents,
            "source": corpus.describe(),
            "fingerprint": fingerprint,
            "seconds": round(time.time() - t0, 2),
        }
        write_meta(tmp, meta)
        (tmp / "config.yaml").write_text(cfg.to_yaml())
    return PrepareResult(folder, meta, False, time.time() - t0)

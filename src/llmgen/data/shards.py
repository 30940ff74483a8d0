"""Token shards: `train.bin` / `val.bin` as flat arrays of token ids, plus `meta.json`.

The files are raw little-endian uint16 (vocabularies up to 65,536) or uint32, so training
maps them with `np.memmap` and reads random windows (`WindowSampler`) with no copy of the corpus
in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llmgen.errors import LlmgenError

FORMAT_VERSION = 1


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays to a .bin file; counts tokens."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = dtype
        self.fh = open(self.path, "wb")
        self.tokens = 0
        self.bytes = 0  # UTF-8 bytes of the text these tokens encode (for bits per byte)
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.fh.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
            self.tokens += int(ids.size)

    def close(self) -> None:
        self.fh.close()


class TokenShards:
    """Read side of a prepared directory: memmapped train/val tokens and their meta.json."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise LlmgenError(f"no prepared data in {self.folder} (meta.json missing); run `llmgen prepare` "
                              f"with the same config first")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]

    def tokens(self, split: str) -> np.ndarray:
        path = self.folder / f"{split}.bin"
        expected = self.meta[f"{split}_tokens"]
        if not path.is_file() or path.stat().st_size != expected * self.dtype.itemsize:
            raise LlmgenError(f"{path} is missing or its size does not match meta.json; run `llmgen prepare` again")
        if expected == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def bytes_per_token(self, split: str) -> Optional[float]:
        """Average UTF-8 bytes of text per token, to turn nats/token into bits/byte."""
        tokens, nbytes = self.meta.get(f"{split}_tokens"), self.meta.get(f"{split}_bytes")
        if not tokens or not nbytes:
            return None
        return nbytes / tokens


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (Path(folder) / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))


class WindowSampler:
    """Random windows of `seq_len + 1` tokens from a memmapped shard, seeded per (seed, step, micro, rank)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) <= seq_len + 1:
            raise LlmgenError(f"the prepared data has only {len(tokens)} tokens, fewer than train.seq_len + 1 "
                              f"({seq_len + 1}); lower train.seq_len or prepare more text")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def __call__(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, rank])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

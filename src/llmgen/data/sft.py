"""Supervised finetuning data: conversations -> (inputs, targets) examples with a loss mask, packed into
rows, and the deterministic batch providers the training loop draws from.

Targets are -100 where no loss is taken (prompts, padding). Packed rows carry per-token positions that
restart at 0 for each example and an attention mask that keeps each example to itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from llmgen.data.chat_format import PromptFormat
from llmgen.data.instruct import encode_conversation

IGNORE = -100


@dataclass
class TaskData:
    name: str
    weight: float
    train: list[tuple[np.ndarray, np.ndarray]]  # (ids, targets) per example, already shifted
    val: list[tuple[np.ndarray, np.ndarray]]
    stream: Optional[np.ndarray] = None  # text datasets: the training token stream
    val_stream: Optional[np.ndarray] = None
    val_convs: list = dataclasses.field(default_factory=list)  # held-out conversations (instruction data)


def encode_examples(tok, fmt: PromptFormat, convs, seq_len: int, train_on_prompt: bool
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """(inputs, targets) per conversation, cut to seq_len; also how many were cut but kept (truncated)
    and how many were dropped because no reply token was left within seq_len."""
    out, truncated, dropped = [], 0, 0
    for conv in convs:
        ids, mask = encode_conversation(tok, fmt, conv, train_on_prompt)
        cut = len(ids) > seq_len + 1
        if cut:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        ids_a = np.asarray(ids, dtype=np.int64)
        targets = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
        if (targets != IGNORE).any():
            out.append((ids_a[:-1], targets))
            truncated += cut
        else:
            dropped += 1
    return out, truncated, dropped


def pack_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate examples into one row: ids, targets, positions and a segment id per token (pads: -1)."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    tgt = np.full(seq_len, IGNORE, dtype=np.int64)
    pos = np.zeros(seq_len, dtype=np.int64)
    seg = np.full(seq_len, -1, dtype=np.int64)
    at = 0
    for k, (x, y) in enumerate(examples):
        n = len(x)
        ids[at:at + n], tgt[at:at + n], pos[at:at + n], seg[at:at + n] = x, y, np.arange(n), k
        at += n
    return ids, tgt, pos, seg


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: causal attention within a segment; pads see themselves."""
    T = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    eye = torch.eye(T, dtype=torch.bool)
    return ((same & causal) | eye)[:, None]


class SFTBatches:
    """Deterministic batches over a weighted mixture of tasks: (step, micro, rank) -> (x, y, kwargs)."""

    def __init__(self, tasks: list[TaskData], batch_size: int, seq_len: int, pad_id: int, seed: int, packing: bool):
        self.tasks, self.B, self.T, self.pad, self.seed, self.packing = tasks, batch_size, seq_len, pad_id, seed, packing
        w = np.array([t.weight for t in tasks], dtype=np.float64)
        self.p = w / w.sum()

    def task_of_rows(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(self.tasks), size=self.B, p=self.p)

    def __call__(self, step: int, micro: int, rank: int):
        rng = np.random.default_rng([self.seed, step, micro, rank])
        rows = []
        for ti in self.task_of_rows(rng):
            task = self.tasks[ti]
            if task.stream is not None:
                s = int(rng.integers(0, len(task.stream) - self.T - 1))
                w = np.asarray(task.stream[s:s + self.T + 1], dtype=np.int64)
                rows.append((w[:-1], w[1:], np.arange(self.T), np.zeros(self.T, dtype=np.int64)))
                continue
            picked, used = [], 0
            for attempt in range(8 if self.packing else 1):
                x, y = task.train[int(rng.integers(len(task.train)))]
                if used + len(x) > self.T:
                    if picked:
                        break
                    continue
                picked.append((x, y))
                used += len(x)
                if not self.packing:
                    break
            if not picked:  # every draw was over-long (cannot happen: examples are cut to seq_len)
                picked = [task.train[0]]
            rows.append(pack_row(picked, self.T, self.pad))
        return _collate(rows)


def _collate(rows) -> tuple:
    ids, tgt, pos, seg = (torch.from_numpy(np.stack(c)) for c in zip(*rows))
    return ids, tgt, {"attn_mask": segment_mask(seg), "positions": pos}


class ValBatches:
    """Validation in a fixed order, one example per row (streams: consecutive windows)."""

    def __init__(self, task: TaskData, batch_size: int, seq_len: int, pad_id: int):
        self.task, self.B, self.T, self.pad = task, batch_size, seq_len, pad_id

    def __call__(self, step: int, i: int, rank: int):
        t = self.task
        if t.val_stream is not None:
            n = max(1, (len(t.val_stream) - 1) // self.T)
            rows = []
            for r in range(self.B):
                s = ((i * self.B + r) % n) * self.T
                w = np.asarray(t.val_stream[s:s + self.T + 1], dtype=np.int64)
                if len(w) < self.T + 1:
                    w = np.concatenate([w, np.full(self.T + 1 - len(w), self.pad)])
                rows.append((w[:-1], w[1:], np.arange(self.T), np.zeros(self.T, dtype=np.int64)))
            return _collate(rows)
        rows = [pack_row([t.val[(i * self.B + r) % len(t.val)]], self.T, self.pad) for r in range(self.B)]
        return _collate(rows)

"""`llmgen pretrain`: a fresh model on prepared token shards, through the shared trainer."""

from __future__ import annotations

import dataclasses

import torch

from llmgen.config import Config
from llmgen.data.shards import TokenShards, WindowSampler
from llmgen.errors import LlmgenError
from llmgen.model.checkpoint import list_checkpoints, read_model_config
from llmgen.model.transformer import Transformer
from llmgen.train.loop import TrainJob, TrainResult, train


def pretrain(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    shards = TokenShards(cfg.data.prepared_dir)
    m, t = cfg.model, cfg.train
    if m.vocab_size and m.vocab_size != shards.vocab_size:
        raise LlmgenError(f"model.vocab_size = {m.vocab_size} but the tokenizer in {shards.folder} has "
                          f"{shards.vocab_size} tokens; remove model.vocab_size or prepare with a matching tokenizer")
    if t.seq_len > m.max_seq_len:
        raise LlmgenError(f"train.seq_len = {t.seq_len} is longer than model.max_seq_len = {m.max_seq_len}; "
                          f"lower train.seq_len or raise model.max_seq_len")
    model_cfg = dataclasses.replace(m, vocab_size=shards.vocab_size)
    ckpts = list_checkpoints(cfg.run_dir)
    if (resume or t.resume == "auto") and ckpts:
        saved, _ = read_model_config(ckpts[-1][1])
        if dataclasses.replace(saved, preset=None) != dataclasses.replace(model_cfg, preset=None):
            raise LlmgenError(f"cannot resume {cfg.run_dir}: its checkpoints hold a different model shape or "
                              f"vocabulary than this config; use the run's config.yaml, or --overwrite")
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg)
    batches = WindowSampler(shards.tokens("train"), t.batch_size, t.seq_len, t.seed)
    val_tokens = shards.tokens("val")
    eval_sets = {}
    if len(val_tokens) > t.seq_len + 1:
        eval_sets["val"] = WindowSampler(val_tokens, t.batch_size, t.seq_len, t.seed + 1)
    job = TrainJob("pretrain", batches, eval_sets, shards.folder, shards.bytes_per_token("val"))
    return train(cfg, model, job, resume=resume, overwrite=overwrite)

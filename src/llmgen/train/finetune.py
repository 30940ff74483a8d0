"""`llmgen finetune`: a base model, a method (full / lora / freeze) and datasets, through the shared trainer.

Instruction data becomes (input ids, targets) with targets at -100 outside the replies. Rows are
packed with several examples; an attention mask keeps each example to itself and positions restart
at 0 for each, so a packed row trains exactly like separate rows. `text` datasets are continued
pretraining: random windows over the token stream, as in `pretrain`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmgen import ui
from llmgen.atomic import atomic_write_text
from llmgen.config import Config
from llmgen.data.instruct import PromptFormat, encode_conversation, iter_records, load_conversations
from llmgen.errors import LlmgenError
from llmgen.evaluate.runner import parse_metrics, run_eval
from llmgen.interop.load import load_model, resolve_model_dir
from llmgen.model.checkpoint import list_checkpoints, save_checkpoint
from llmgen.model.lora import apply_lora, load_adapter_weights, lora_info, save_adapter
from llmgen.train.loop import TrainJob, TrainResult, train

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
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """(inputs, targets) per conversation, cut to seq_len; returns also how many were truncated."""
    out, truncated = [], 0
    for conv in convs:
        ids, mask = encode_conversation(tok, fmt, conv, train_on_prompt)
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            truncated += 1
        ids_a = np.asarray(ids, dtype=np.int64)
        targets = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
        if (targets != IGNORE).any():
            out.append((ids_a[:-1], targets))
    return out, truncated


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


def _text_stream(tok, source: str, text_field: str) -> np.ndarray:
    pieces = []
    for rec, where in iter_records(source, text_field=text_field):
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise LlmgenError(f"{where}: missing field `{text_field}` required by format `text`")
        pieces.append(np.asarray(tok.encode(text) + [tok.eot_id], dtype=np.int64))
    if not pieces:
        raise LlmgenError(f"dataset {source}: no text found")
    return np.concatenate(pieces)


def load_tasks(cfg: Config, tok, fmt: PromptFormat, seq_len: int) -> list[TaskData]:
    ft = cfg.finetune
    tasks = []
    names = [Path(d.source).stem if not d.source.startswith(("builtin:", "hf:")) else d.source for d in ft.datasets]
    for spec, name in zip(ft.datasets, names):
        if names.count(name) > 1:
            name = f"{name}#{ft.datasets.index(spec)}"
        if spec.format == "text":
            stream = _text_stream(tok, spec.source, cfg.data.text_field)
            n_val = int(len(stream) * ft.val_fraction)
            if len(stream) - n_val <= seq_len + 1:
                raise LlmgenError(f"dataset {spec.source}: {len(stream)} tokens is too little text for seq_len {seq_len}")
            tasks.append(TaskData(name, spec.weight, [], [], stream[:len(stream) - n_val],
                                  stream[len(stream) - n_val:] if n_val > seq_len else None))
            continue
        convs = load_conversations(spec.source, spec.format, cfg.data.seed, ft.max_examples)
        # split by example before encoding, so the held-out conversations can also be generated for
        order = np.random.default_rng(cfg.train.seed).permutation(len(convs))
        if ft.val_examples is not None:
            n_val = min(ft.val_examples, len(convs) - 1)
        else:
            n_val = max(1, int(round(len(convs) * ft.val_fraction))) if ft.val_fraction > 0 and len(convs) > 1 else 0
        val_convs = [convs[i] for i in order[:n_val]]
        train_ex, truncated = encode_examples(tok, fmt, [convs[i] for i in order[n_val:]], seq_len, ft.train_on_prompt)
        val, val_trunc = encode_examples(tok, fmt, val_convs, seq_len, ft.train_on_prompt)
        if truncated + val_trunc:
            ui.info(f"{spec.source}: {truncated + val_trunc} of {len(convs)} examples were longer than seq_len "
                    f"{seq_len} and were truncated")
        if not train_ex:
            raise LlmgenError(f"dataset {spec.source}: no example keeps any response token within seq_len {seq_len}")
        tasks.append(TaskData(name, spec.weight, train_ex, val, val_convs=val_convs))
    return tasks


def score_heldout(cfg: Config, model_dir: Path, heldout: Path, metrics: list[str]) -> dict:
    """Generate for the held-out examples with the finetuned model and score the replies; the report
    goes beside them (heldout_eval.json)."""
    report = run_eval(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_samples=None)),
                      [str(model_dir)], [m for m in metrics if m != "ppl"], str(heldout),
                      output=heldout.with_name("heldout_eval.json"))
    scores = report["results"][0]["scores"]
    ui.info("held-out examples: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) +
            f" (compare the base: llmgen eval --model <base> --data {heldout} --metrics {','.join(metrics)})")
    return report


def freeze(model: torch.nn.Module, ft: FinetuneConfig) -> None:
    """Train only the top blocks (trainable_layers, or all but the bottom freeze_layers) and named parts."""
    n = model.cfg.n_layer
    if ft.trainable_layers is not None:
        first = n - min(ft.trainable_layers, n)
    elif ft.freeze_layers is not None:
        first = min(ft.freeze_layers, n)
    else:
        first = n // 2
    parts = set(ft.trainable_parts) if ft.trainable_parts else {"norm_f"}
    known = {"norm_f", "lm_head", "tok_emb", "pos_emb", "norm"}
    bad = parts - known
    if bad:
        raise LlmgenError(f"finetune.trainable_parts: unknown {', '.join(sorted(bad))}; choose from {', '.join(sorted(known))}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        top = name.split(".")[0]
        if (m and int(m.group(1)) >= first) or top in parts or ("norm" in parts and "norm" in name):
            p.requires_grad_(True)
    if ft.trainable_parts and "lm_head" in parts and model.cfg.tie_embeddings:
        model.tok_emb.weight.requires_grad_(True)  # the head is the embedding matrix


def default_base(cfg: Config) -> str:
    run = Path(cfg.run_dir)
    if (run / "final" / "config.json").is_file():
        return str(run / "final")
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise LlmgenError(f"no pretrained model in {run} to finetune; run `llmgen pretrain` first or set "
                          f"finetune.base (a run/checkpoint directory, an HF model folder, hf:<id> or a .gguf file)")
    return str(ckpts[-1][1])


def finetune_run_dir(cfg: Config) -> str:
    return cfg.finetune.run_dir or str(Path(cfg.run_dir) / "finetune")


def finetune(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    ft = cfg.finetune
    if ft.eval_metrics:  # fail before training, not after it
        parse_metrics(",".join(ft.eval_metrics), [])
    base_arg = ft.base or default_base(cfg)
    base_dir = resolve_model_dir(base_arg, cfg.run_dir)
    lm = load_model(str(base_dir), cfg.run_dir)
    model, tok = lm.model, lm.tokenizer
    if ft.dropout is not None:
        model.cfg = dataclasses.replace(model.cfg, dropout=ft.dropout)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = ft.dropout
            if hasattr(m, "dropout") and isinstance(getattr(m, "dropout"), float):
                m.dropout = ft.dropout
    seq_len = min(ft.seq_len or 512, model.cfg.max_seq_len)  # examples need the whole context
    instruct = any(d.format != "text" for d in ft.datasets)
    fmt = lm.prompt_format or PromptFormat.choose(tok, ft.template)
    if ft.template and ft.template != fmt.name:
        fmt = PromptFormat(ft.template)
    if any(d.format == "chat" for d in ft.datasets) and not (ft.template or tok.chat_template or lm.prompt_format):
        raise LlmgenError("chat data needs a chat template, and this base's tokenizer has none; set "
                          "finetune.template: chatml (or alpaca/plain)")
    tasks = load_tasks(cfg, tok, fmt, seq_len)
    B = ft.batch_size or cfg.train.batch_size
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    batches = SFTBatches(tasks, B, seq_len, pad, cfg.train.seed, ft.packing)
    eval_sets = {}
    with_val = [t for t in tasks if t.val or t.val_stream is not None]
    for t in with_val:
        eval_sets["val" if len(with_val) == 1 else t.name] = ValBatches(t, B, seq_len, pad)
    if len(with_val) > 1:  # the headline val loss: the mixture's val sets, by weight, in a fixed order
        mix = SFTBatches(with_val, B, seq_len, pad, cfg.train.seed + 1, packing=False)
        mix.tasks = [dataclasses.replace(t, train=t.val or t.train, stream=t.val_stream) for t in with_val]
        eval_sets = {"val": mix, **eval_sets}

    info: dict = {"base": str(Path(base_dir).resolve()), "finetune_method": ft.method,
                  "datasets": [dataclasses.asdict(d) for d in ft.datasets]}
    if instruct:
        info["prompt_format"] = fmt.to_json()
    job = TrainJob("finetune", batches, eval_sets, Path(base_dir), layer_lr_decay=ft.layer_lr_decay, info=info)
    if ft.method == "lora":
        model = apply_lora(model, ft.lora)
        info["adapter"] = {"base": str(Path(base_dir).resolve()), **lora_info(ft.lora)}
        job.save_weights, job.load_weights = save_adapter, load_adapter_weights
    elif ft.method == "freeze" or ft.freeze_layers is not None or ft.trainable_layers is not None:
        freeze(model, ft)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    ui.info(f"finetune ({ft.method}) of {base_dir}: {n_train / 1e6:.3f}M of {n_all / 1e6:.2f}M parameters trainable "
            f"({n_train / n_all:.2%}); {sum(len(t.train) for t in tasks):,} train examples in {len(tasks)} dataset(s), "
            f"prompt format {fmt.name if instruct else 'none (text)'}")
    info["trainable_params"] = n_train

    lr = ft.lr or cfg.train.lr * 0.5
    tcfg = dataclasses.replace(cfg.train, lr=lr, min_lr=lr * 0.1, max_steps=ft.max_steps, warmup_steps=ft.warmup_steps,
                               batch_size=B, seq_len=seq_len, eval_every=ft.eval_every,
                               save_every=max(ft.eval_every, cfg.train.save_every if cfg.train.save_every < ft.max_steps else ft.max_steps))
    run_cfg = dataclasses.replace(cfg, run_dir=finetune_run_dir(cfg), train=tcfg)
    result = train(run_cfg, model, job, resume=resume, overwrite=overwrite)
    heldout = [c for t in tasks for c in t.val_convs]
    if heldout and result.final_dir is not None:
        path = Path(run_cfg.run_dir) / "heldout.jsonl"
        atomic_write_text(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in heldout))
        if ft.eval_metrics:
            score_heldout(cfg, result.final_dir, path, ft.eval_metrics)
    if ft.method == "lora" and ft.merge and result.final_dir is not None:
        merged = load_model(str(result.final_dir))
        meta = {k: v for k, v in merged.meta.items() if k not in ("adapter", "model", "llmgen_version")}
        save_checkpoint(Path(run_cfg.run_dir) / "merged", merged.model, result.final_dir, meta)
        ui.info(f"merged LoRA model written to {Path(run_cfg.run_dir) / 'merged'}")
    return result

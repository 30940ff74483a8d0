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
from pathlib import Path

import numpy as np
import torch

from llmgen import ui
from llmgen.atomic import atomic_write_text
from llmgen.config import Config, FinetuneConfig
from llmgen.data.chat_format import PromptFormat
from llmgen.data.instruct import load_conversations
from llmgen.data.records import field, read_records
from llmgen.data.sft import SFTBatches, TaskData, ValBatches, encode_examples
from llmgen.errors import LlmgenError
from llmgen.evaluate.runner import parse_metrics, run_eval
from llmgen.interop.load import load_model, resolve_model_dir
from llmgen.model.checkpoint import list_checkpoints, save_checkpoint
from llmgen.model.lora import apply_lora, load_adapter_weights, lora_info, save_adapter
from llmgen.train.loop import TrainJob, TrainResult, train

def _text_stream(tok, source: str, text_field: str) -> np.ndarray:
    pieces = []
    for rec, where in read_records(source, text_field=text_field):
        text = field(rec, text_field, where, "format `text` reads data.text_field; set it to the field with the text")
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
        train_ex, cut, dropped = encode_examples(tok, fmt, [convs[i] for i in order[n_val:]], seq_len,
                                                 ft.train_on_prompt)
        val, val_cut, val_dropped = encode_examples(tok, fmt, val_convs, seq_len, ft.train_on_prompt)
        if cut + val_cut:
            ui.info(f"{spec.source}: {cut + val_cut} of {len(convs)} examples were longer than seq_len {seq_len} and "
                    f"were truncated (their reply is partly kept)")
        if dropped + val_dropped:
            ui.info(f"{spec.source}: {dropped + val_dropped} of {len(convs)} examples were dropped: their reply starts "
                    f"past seq_len {seq_len}; raise finetune.seq_len to keep them")
        if not train_ex:
            raise LlmgenError(f"dataset {spec.source}: none of its {len(convs)} examples keeps a reply token within "
                              f"seq_len {seq_len}; raise finetune.seq_len (at most model.max_seq_len) or shorten "
                              f"the prompts")
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


# train.* keys finetune does not read, and the finetune.* key it reads instead
_FINETUNE_OWN = {"max_steps": "finetune.max_steps", "warmup_steps": "finetune.warmup_steps",
                 "eval_every": "finetune.eval_every", "seq_len": "finetune.seq_len (null: the model's context, at most 512)",
                 "min_lr": "finetune.lr (the schedule ends at a tenth of it)"}


def finetune(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    ft = cfg.finetune
    for key, use in _FINETUNE_OWN.items():  # train.* keys that finetune replaces by its own
        if f"train.{key}" in cfg.explicit:
            ui.info(f"train.{key} does not apply to finetune; it uses {use}")
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
        torch.manual_seed(cfg.train.seed)  # the adapters' initial weights: the same run from the same seed
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

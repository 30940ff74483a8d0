"""The training loop shared by pretrain and finetune, on `accelerate`.

Read top to bottom: get batch -> forward -> backward (accumulated) -> clip -> step -> log ->
eval -> checkpoint. What differs between pretraining and finetuning (data, trainable
parameters, loss mask) comes in through `Batches` and the model; the loop stays one.

Resuming is exact: batches are a pure function of (seed, step, micro-step, rank), the LR is a
pure function of the step, and the checkpoint carries optimizer and RNG states.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from llmgen import ui
from llmgen.config import Config, save_config
from llmgen.errors import LlmgenError
from llmgen.model.checkpoint import copy_checkpoint, list_checkpoints, load_state, load_weights, save_checkpoint
from llmgen.train.logging import RunLog
from llmgen.train.optim import lr_at, make_optimizer

# A batch provider: (step, micro_step, rank) -> (inputs (B, T), targets (B, T)[, model kwargs such as
# attn_mask/positions for packed examples]), deterministic.
BatchFn = Callable[[int, int, int], tuple]


def _unpack(batch: tuple, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x, y, *rest = batch
    kw = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), kw


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


def _matmul_peak_flops(device: torch.device) -> float:
    """Measured dense matmul FLOP/s on this device (fp32 on CPU, bf16 on CUDA), for MFU."""
    n = 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.ones(n, n, device=device, dtype=dtype)  # values do not matter; keep the RNG untouched
    b = torch.ones(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 10 if device.type == "cpu" else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((s["python_version"], tuple(s["python"]), None))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Optional[Path]
    step: int
    best_val_loss: Optional[float]
    interrupted: bool = False
    stopped_early: bool = False
    skipped_steps: int = 0
    history: list = field(default_factory=list)
    tokens_per_s: float = 0.0  # over the whole run, evaluation and checkpoints included
    peak_memory_mb: float = 0.0  # CUDA: peak allocated on the device; CPU: the process's peak RSS


def mixed_precision_mode(setting: str) -> str:
    """accelerate's mixed_precision value for `train.mixed_precision`."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"  # fp32 on CPU: bf16 is far slower than fp32 on most CPUs
    return "no" if setting == "fp32" else setting


def _fsdp_plugin():
    """FSDP2: each transformer block is one shard unit, full state dicts gathered for checkpoints."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["Block"], reshard_after_forward=True,
                                          state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def _full_weights_saver(weights: dict[str, torch.Tensor]) -> Callable:
    """A save_weights hook writing an already gathered state dict (tied weights stored once)."""
    def save(folder: Path, model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        if getattr(model.cfg, "tie_embeddings", False):
            sd.pop("tok_emb.weight", None)  # as safetensors.save_model stores tied weights
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return save


def train(cfg: Config, model: torch.nn.Module, batches: BatchFn, eval_sets: dict[str, BatchFn],
          tokenizer_dir: Path, bytes_per_token: Optional[float], resume: bool = False,
          overwrite: bool = False, kind: str = "pretrain", layer_lr_decay: float = 1.0,
          save_weights: Optional[Callable] = None, load_weights_fn: Optional[Callable] = None,
          info: Optional[dict] = None) -> TrainResult:
    """Run the loop described in the module docstring; returns where the final checkpoint is.

    Finetuning passes its trainable-parameter choices through the model itself (frozen params, a
    peft wrapper), LR multipliers through `layer_lr_decay`, and for LoRA `save_weights`/`load_weights_fn`
    that write/read only the adapter; `info` is added to every checkpoint's config.json."""
    from accelerate import Accelerator

    t = cfg.train
    run_dir = Path(cfg.run_dir)
    ckpts = list_checkpoints(run_dir)
    has_run = bool(ckpts) or (run_dir / "metrics.jsonl").is_file()
    resume = resume or t.resume == "auto"
    if has_run and not resume and not overwrite:
        raise LlmgenError(f"run_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                          f"start over, or set run_dir to a new folder")
    # cpu=True on a CPU-only machine makes accelerate run torchrun/accelerate-launch processes as gloo DDP
    fsdp = t.distributed == "fsdp"
    if fsdp and save_weights is not None:
        raise LlmgenError("train.distributed: fsdp cannot be combined with finetune.method: lora (adapters are "
                          "small: use ddp)")
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision_mode(t.mixed_precision),
                      gradient_accumulation_steps=t.grad_accum_steps, fsdp_plugin=_fsdp_plugin() if fsdp else None)
    main = acc.is_main_process
    if has_run and overwrite and not resume and main:
        for sub in ("checkpoints", "final", "metrics.jsonl", "loss.png", "tensorboard"):
            p = run_dir / sub
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        ckpts = []

    start_step, best_val, bad_evals, skipped = 0, math.inf, 0, 0
    state = None
    best_dir: dict[str, Path] = {}
    if resume and ckpts:
        step_n, folder = ckpts[-1]
        (load_weights_fn or load_weights)(model, folder)
        state = load_state(folder)
        start_step = state["step"]
        best_val, bad_evals, skipped = state["best_val"], state["bad_evals"], state["skipped"]
        if (run_dir / "checkpoints" / f"step-{state['best_step']}").is_dir():
            best_dir["path"] = run_dir / "checkpoints" / f"step-{state['best_step']}"
        if main:
            ui.info(f"resuming from {folder} (step {start_step})")
    elif resume and main:
        ui.info(f"no checkpoint in {run_dir}/checkpoints yet; starting from scratch")

    torch.manual_seed(t.seed + acc.process_index)
    optimizer = make_optimizer(model, t, acc.device.type, layer_lr_decay)
    model, optimizer = acc.prepare(model, optimizer)
    if state is not None:
        if state.get("distributed", "ddp") != t.distributed:
            raise LlmgenError(f"this run was saved with train.distributed: {state.get('distributed', 'ddp')}; "
                              f"resume it with the same setting")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    raw = acc.unwrap_model(model)
    if t.compile:
        model = torch.compile(model)

    stop = {"sigint": False}

    def on_sigint(signum, frame):
        if stop["sigint"]:
            raise KeyboardInterrupt
        stop["sigint"] = True

    # Ctrl-C: finish the step, save, exit 0; a second Ctrl-C aborts at once
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = RunLog(run_dir, resume_step=start_step) if main else None
    n_params = raw.num_params()
    fpt = raw.flops_per_token(t.seq_len)
    peak = _matmul_peak_flops(acc.device)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps * acc.num_processes
    if main:
        ui.info(f"{kind}: {n_params / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOPs/token, "
                f"{tokens_per_step:,} tokens/step, {acc.num_processes} process(es) on {acc.device}, "
                f"precision {acc.mixed_precision}" + (", FSDP-sharded" if fsdp else "") +
                f"; matmul peak {peak / 1e9:.0f} GFLOP/s")


    def evaluate() -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad():
            for name, fn in eval_sets.items():
                losses = []
                for i in range(t.eval_steps):
                    x, y, kw = _unpack(fn(0, i, acc.process_index), acc.device)
                    with acc.autocast():
                        _, loss = model(x, targets=y, **kw)
                    losses.append(loss.float())
                mean = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
                out[name] = mean
        model.train()
        return out

    def checkpoint(step: int, val: Optional[float]) -> Path:
        folder = run_dir / "checkpoints" / f"step-{step}"
        if fsdp:  # gather the full weights and optimizer state onto rank 0 (a collective: every rank calls it)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            weights = acc.get_state_dict(model)
            opt_state = get_optimizer_state_dict(model, optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            tensors = list(weights.values()) if main else []
        else:
            weights, opt_state, tensors = None, optimizer.state_dict(), list(raw.parameters())
        if not all(bool(torch.isfinite(p).all()) for p in tensors):
            raise LlmgenError(f"the weights became non-finite (nan/inf) by step {step}; no checkpoint was written "
                              f"for it. Lower train.lr or raise train.warmup_steps / train.grad_clip")
        if main:
            best_step = int(best_dir["path"].name.split("-")[1]) if "path" in best_dir else -1
            st = {"step": step, "optimizer": opt_state, "rng": _rng_state(), "best_val": best_val,
                  "bad_evals": bad_evals, "skipped": skipped, "best_step": best_step, "distributed": t.distributed}
            saver = _full_weights_saver(weights) if weights is not None else save_weights
            save_checkpoint(folder, raw, tokenizer_dir, {"step": step, "val_loss": val, "kind": kind, **(info or {})}, st,
                            save_weights=saver)
            for _, old in list_checkpoints(run_dir)[:-t.keep_last_n]:
                if t.keep == "best" and best_dir.get("path") == old:
                    continue
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return folder

    model.train()
    step = start_step
    last_val: Optional[float] = None
    interrupted = stopped_early = False
    t_last, tokens_since = time.perf_counter(), 0
    t_start = t_last
    try:
        with ui.progress(kind, t.max_steps, unit="steps", enabled=main) as bar:
            bar.advance(start_step)
            while step < t.max_steps:
                lr = lr_at(step, t)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=acc.device)
                for micro in range(t.grad_accum_steps):
                    x, y, kw = _unpack(batches(step, micro, acc.process_index), acc.device)
                    with acc.accumulate(model):
                        with acc.autocast():
                            _, loss = model(x, targets=y, **kw)
                        acc.backward(loss)
                        loss_sum += loss.detach().float()
                        if acc.sync_gradients and t.grad_clip > 0:
                            acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                        finite = torch.isfinite(loss_sum).all()
                        if acc.sync_gradients and not bool(finite):
                            optimizer.zero_grad(set_to_none=True)
                            if not t.skip_nonfinite:
                                raise LlmgenError(f"the loss became {loss_sum.item()} at step {step}; no checkpoint "
                                                  f"was written for it. Lower train.lr or raise train.warmup_steps, "
                                                  f"or set train.skip_nonfinite: true to skip such steps")
                            skipped += 1
                        else:
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_since += tokens_per_step
                bar.advance(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    loss_val = acc.reduce(loss_sum / t.grad_accum_steps, reduction="mean").item()
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    rec = {"step": step, "loss": round(loss_val, 5), "lr": lr, "tokens_per_s": round(tps, 1),
                           "mfu": round(tps * fpt / (peak * acc.num_processes), 4),
                           "elapsed_s": round(now - t_start, 2)}
                    if main:
                        log.log(rec)
                        bar.update(info=f"loss {loss_val:.3f} lr {lr:.2e} {tps:,.0f} tok/s MFU {rec['mfu']:.1%}")
                do_eval = step % t.eval_every == 0 or step == t.max_steps
                if do_eval and eval_sets:
                    vals = evaluate()
                    last_val = vals.get("val", next(iter(vals.values())))
                    rec = {"step": step, "val_loss": round(last_val, 5), "val_ppl": round(math.exp(min(last_val, 50)), 3),
                           "elapsed_s": round(time.perf_counter() - t_start, 2)}
                    if bytes_per_token:
                        rec["val_bpb"] = round(last_val / math.log(2) / bytes_per_token, 5)
                    rec.update({f"val_loss/{k}": round(v, 5) for k, v in vals.items() if k != "val"})
                    improved = last_val < best_val - 1e-6
                    if improved:
                        best_val, bad_evals = last_val, 0
                    else:
                        bad_evals += 1
                    if main:
                        log.log(rec)
                        log.plot()
                        ui.info(f"step {step}: val loss {last_val:.4f}" +
                                (f", {rec['val_bpb']:.4f} bits/byte" if "val_bpb" in rec else "") +
                                (" (best)" if improved else ""))
                    if improved or step % t.save_every == 0 or step == t.max_steps:
                        folder = checkpoint(step, last_val)
                        if improved:
                            best_dir["path"] = folder
                    if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                        stopped_early = True
                        if main:
                            ui.info(f"early stopping: no val improvement in {bad_evals} evals")
                        break
                elif step % t.save_every == 0:
                    checkpoint(step, None)
                if stop["sigint"]:
                    interrupted = True
                    break
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if log is not None:
            log.close()

    ckpts = list_checkpoints(run_dir)
    if not ckpts or ckpts[-1][0] != step:
        checkpoint(step, last_val)
    if interrupted:
        if main:
            ui.info(f"interrupted: saved a checkpoint at step {step}; continue with "
                    f"`llmgen {kind} --resume` (same --config/--set)")
        return TrainResult(run_dir, None, step, best_val if best_val < math.inf else None, interrupted=True,
                           skipped_steps=skipped)
    if acc.num_processes > 1 and not fsdp:  # DDP invariant: every rank holds the same weights
        checksum = torch.stack([p.detach().float().sum() for p in raw.parameters()]).sum().reshape(1)
        sums = acc.gather(checksum.to(acc.device))
        if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-6):
            raise RuntimeError(f"ranks diverged: weight checksums {sums.tolist()}")
        if main:
            ui.info(f"{acc.num_processes} ranks in sync (weight checksum {sums[0].item():.6f})")
    chosen = best_dir.get("path") if t.keep == "best" and "path" in best_dir else list_checkpoints(run_dir)[-1][1]
    final = run_dir / "final"
    if main:
        copy_checkpoint(chosen, final)
        if log is not None:
            log.plot()
    acc.wait_for_everyone()
    if acc.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(acc.device) / 2 ** 20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = tokens_per_step * (step - start_step) / max(time.perf_counter() - t_start, 1e-9)
    return TrainResult(run_dir, final, step, best_val if best_val < math.inf else None,
                       stopped_early=stopped_early, skipped_steps=skipped, tokens_per_s=rate, peak_memory_mb=peak_mb)

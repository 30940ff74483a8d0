"""The training loop shared by pretrain and finetune, on `accelerate`.

`train()` reads top to bottom: set up, then per step: batch -> forward/backward (accumulated) ->
clip -> optimizer step -> log -> eval -> checkpoint. What differs between pretraining and
finetuning (data, trainable parameters, loss mask, adapter-only checkpoints) comes in through a
`TrainJob` and the model; the loop stays one. Everything that changes while it runs lives in one
`TrainState`.

Resuming is exact: batches are a pure function of (seed, step, micro-step, rank), the LR is a
pure function of the step, and the checkpoint carries optimizer and RNG states.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from llmgen import ui
from llmgen.atomic import exclusive
from llmgen.config import Config, save_config
from llmgen.errors import LlmgenError
from llmgen.kernels import training as kernels
from llmgen.model.checkpoint import load_state, load_weights, save_checkpoint
from llmgen.train import distributed as dist
from llmgen.train.logging import RunLog
from llmgen.train.loss import LanguageModelLoss
from llmgen.train.optim import fold_clip, lr_at, make_optimizer
from llmgen.train.run_dir import RunDir, rng_state, set_rng_state

# A batch provider: (step, micro_step, rank) -> (inputs (B, T), targets (B, T)[, model kwargs such as
# attn_mask/positions for packed examples]), deterministic.
BatchFn = Callable[[int, int, int], tuple]


@dataclass
class TrainJob:
    """What a command hands the loop besides the config and the model."""

    kind: str  # pretrain | finetune: names the progress bar and the checkpoints
    batches: BatchFn
    eval_sets: dict[str, BatchFn]
    tokenizer_dir: Path  # its tokenizer files are copied into every checkpoint
    bytes_per_token: Optional[float] = None  # for bits per byte in the val logs
    layer_lr_decay: float = 1.0
    save_weights: Optional[Callable] = None  # (folder, model): e.g. a LoRA adapter only
    load_weights: Callable = load_weights  # (model, folder), its counterpart on resume
    info: dict = field(default_factory=dict)  # added to every checkpoint's config.json


@dataclass
class TrainState:
    """All the loop changes as it runs; what a checkpoint's training_state saves besides optimizer/RNG."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1  # the checkpoint with best_val
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    skipped: int = 0  # steps skipped for a non-finite loss (train.skip_nonfinite)
    last_val: Optional[float] = None
    stop_requested: bool = False  # Ctrl-C: finish the step, save, return
    stopped_early: bool = False

    def saved(self) -> dict:
        return {"step": self.step, "best_val": self.best_val, "bad_evals": self.bad_evals,
                "skipped": self.skipped, "best_step": self.best_step}


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


class Trainer:
    """The parts of a run the loop calls by name; `train()` below is the loop itself."""

    def __init__(self, cfg: Config, model: torch.nn.Module, job: TrainJob, resume: bool, overwrite: bool):
        t = self.t = cfg.train
        self.cfg, self.job, self.run = cfg, job, RunDir(cfg.run_dir)
        resume = resume or t.resume == "auto"
        self.run.check_start(resume, overwrite)
        self.fsdp = t.distributed == "fsdp"
        if self.fsdp and job.save_weights is not None:
            raise LlmgenError("train.distributed: fsdp cannot be combined with finetune.method: lora (adapters are "
                              "small: use ddp)")
        self.acc, self.precision_why = dist.make_accelerator(t)
        acc = self.acc
        self.main = acc.is_main_process
        if self.run.holds_run() and overwrite and not resume and self.main:
            self.run.clear()
        self.state, saved = TrainState(), None
        ckpts = self.run.checkpoints() if resume else []
        for _, folder in reversed(ckpts):  # the newest checkpoint that loads
            try:
                saved = load_state(folder)
                job.load_weights(model, folder)
                break
            except LlmgenError as e:
                saved = None
                self.say(f"{e}; trying the checkpoint before it")
        if saved is not None:
            self.state = TrainState(step=saved["step"], best_val=saved["best_val"], bad_evals=saved["bad_evals"],
                                    skipped=saved["skipped"], best_step=saved["best_step"])
            if not self.run.step_dir(self.state.best_step).is_dir():
                self.state.best_step = -1
            self.say(f"resuming from {folder} (step {self.state.step})")
        elif ckpts:
            raise LlmgenError(f"no checkpoint in {self.run.path}/checkpoints could be loaded (see above); start over "
                              f"with --overwrite")
        elif resume:
            self.say(f"no checkpoint in {self.run.path}/checkpoints yet; starting from scratch")
        self.start_step = self.state.step

        torch.manual_seed(t.seed + acc.process_index)
        optimizer = make_optimizer(model, t, acc.device.type, job.layer_lr_decay)
        self.net = model  # the network (or its peft wrapper; FSDP shards it in place): checkpoints, counts
        # compiled on a GPU, inductor fuses logits + cross-entropy itself: the plain loss measured 3-8 % faster
        # steps than the chunked one there (gpt2-124m, H200), at the same peak memory
        loss = LanguageModelLoss(model, chunked=not (t.compile and acc.device.type == "cuda"))
        # on the CPU, fused RMSNorm/RoPE/attention/SwiGLU/GELU/softmax/AdamW (~25 % of a small model's eager step);
        # compiled, inductor fuses them
        self.kernels = (kernels.enable(model, loss, optimizer) if t.kernels and acc.device.type == "cpu" and not t.compile
                        else None)
        if acc.device.type == "cpu":
            kernels.keep_freed_memory()  # each step reuses the last one's memory instead of faulting it back in
        self.model, self.optimizer = acc.prepare(loss, optimizer)
        if saved is not None:
            if saved.get("distributed", "ddp") != t.distributed:
                raise LlmgenError(f"this run was saved with train.distributed: {saved.get('distributed', 'ddp')}; "
                                  f"resume it with the same setting")
            dist.load_optimizer_state(self.model, self.optimizer, saved["optimizer"], self.fsdp)
            set_rng_state(saved["rng"])
        if t.compile:
            self.model = torch.compile(self.model)
        self.skipped_before, self.deferred = self.state.skipped, None
        if defer_nonfinite_check(acc, optimizer):
            dev = acc.device
            self.deferred = {"count": torch.zeros((), dtype=torch.long, device=dev),
                             "first_step": torch.full((), -1, dtype=torch.long, device=dev),
                             "first_loss": torch.zeros((), device=dev)}
        self.log = None
        if self.main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run.path / "config.yaml")
            self.log = RunLog(self.run.path, resume_step=self.state.step)
        self.flops_per_token = self.net.flops_per_token(t.seq_len)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision), torch.float32)
        self.peak = dist.matmul_peak_flops(acc.device, compute)
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps * acc.num_processes

    def say(self, text: str) -> None:
        if self.main:
            ui.info(text)

    def batch(self, fn: BatchFn, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, y, *rest = fn(step, micro, self.acc.process_index)
        dev = self.acc.device

        def move(t: torch.Tensor) -> torch.Tensor:  # from pinned memory a GPU copy does not block the host
            return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)
        kw = {k: move(v) for k, v in (rest[0] if rest else {}).items()}
        return move(x), move(y), kw

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the summed micro losses.
        A non-finite loss stops the run, or with train.skip_nonfinite skips the update."""
        t, acc = self.t, self.acc
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(t.grad_accum_steps):
            x, y, kw = self.batch(self.job.batches, step, micro)
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = self.model(x, y, **kw)
                acc.backward(loss)
                loss_sum += loss.detach().float()
                if not acc.sync_gradients:
                    continue
                if t.grad_clip > 0:
                    self.clip()
                self.update(loss_sum, step)
                self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def clip(self) -> None:
        """Gradients to a global norm of train.grad_clip: inside the fused AdamW's step where there is one and no
        fp16 loss scaler (optim.fold_clip), else through accelerate (FSDP's sharded norm, unscaling)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
        if self.acc.scaler is not None or not fold_clip(inner, self.t.grad_clip):
            self.acc.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)

    def update(self, loss_sum: torch.Tensor, step: int) -> None:
        """The optimizer step, skipped when the loss is not finite. On a GPU with a fused optimizer the
        skip happens on the device (the fused kernel's `found_inf` input), so the host never waits for
        the step to finish; `settle()` reads the outcome at the next log, evaluation or checkpoint.
        Elsewhere the loss is read back at once."""
        bad = ~torch.isfinite(loss_sum)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
        if self.deferred is None:
            try:
                if not bool(bad):
                    self.optimizer.step()
                elif self.t.skip_nonfinite:
                    self.state.skipped += 1
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.nonfinite_error(loss_sum.item(), step)
            finally:
                inner.grad_scale = None  # this step's clip factor (optim.fold_clip)
            return
        inner.found_inf = bad.float()
        try:
            self.optimizer.step()
        finally:
            inner.found_inf = inner.grad_scale = None
        d = self.deferred
        first = bad & (d["first_step"] < 0)
        d["first_step"] = torch.where(first, step, d["first_step"])
        d["first_loss"] = torch.where(first, loss_sum, d["first_loss"])
        d["count"] += bad.long()

    def settle(self) -> None:
        """Account for the updates skipped on the device since the start (see `update`)."""
        if self.deferred is None:
            return
        d = self.deferred
        n = int(d["count"].item())
        if n and not self.t.skip_nonfinite:
            self.nonfinite_error(d["first_loss"].item(), int(d["first_step"].item()))
        self.state.skipped = self.skipped_before + n

    def nonfinite_error(self, loss: float, step: int) -> None:
        raise LlmgenError(f"the loss became {loss} at step {step}; no checkpoint was written for it. Lower "
                          f"train.lr or raise train.warmup_steps, or set train.skip_nonfinite: true to skip such "
                          f"steps")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_steps fixed batches of every eval set, averaged over the ranks."""
        self.model.eval()
        out = {}
        for name, fn in self.job.eval_sets.items():
            losses = []
            for i in range(self.t.eval_steps):
                x, y, kw = self.batch(fn, 0, i)
                with self.acc.autocast():
                    losses.append(self.model(x, y, **kw).float())
            out[name] = self.acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        self.model.train()
        return out

    def record_eval(self, vals: dict[str, float]) -> bool:
        """Log an evaluation and track the best val loss; True when it improved."""
        st = self.state
        st.last_val = val = vals.get("val", next(iter(vals.values())))
        rec = {"step": st.step, "val_loss": round(val, 5), "val_ppl": round(math.exp(min(val, 50)), 3),
               "elapsed_s": round(time.perf_counter() - self.t_start, 2)}
        if self.job.bytes_per_token:
            rec["val_bpb"] = round(val / math.log(2) / self.job.bytes_per_token, 5)
        rec.update({f"val_loss/{k}": round(v, 5) for k, v in vals.items() if k != "val"})
        improved = val < st.best_val - 1e-6
        st.best_val, st.bad_evals = (val, 0) if improved else (st.best_val, st.bad_evals + 1)
        if self.main:
            self.log.log(rec)
            ui.info(f"step {st.step}: val loss {val:.4f}" +
                    (f", {rec['val_bpb']:.4f} bits/byte" if "val_bpb" in rec else "") + (" (best)" if improved else ""))
            self.log.plot()
        return improved

    def checkpoint(self, val: Optional[float]) -> Path:
        """Save the weights, optimizer, RNG and loop state at the current step (all ranks call it)."""
        self.settle()  # never a checkpoint past an unreported non-finite loss
        st, acc = self.state, self.acc
        folder = self.run.step_dir(st.step)
        if self.fsdp:
            weights, opt_state = dist.gather_full_state(acc, self.model, self.optimizer)
            tensors, saver = (list(weights.values()) if self.main else []), dist.full_weights_saver(weights)
        else:
            opt_state, tensors, saver = self.optimizer.state_dict(), list(self.net.parameters()), self.job.save_weights
        if not all(bool(torch.isfinite(p).all()) for p in tensors):
            raise LlmgenError(f"the weights became non-finite (nan/inf) by step {st.step}; no checkpoint was written "
                              f"for it. Lower train.lr or raise train.warmup_steps / train.grad_clip")
        if self.main:
            state = {**st.saved(), "optimizer": opt_state, "rng": rng_state(), "distributed": self.t.distributed}
            save_checkpoint(folder, self.net, self.job.tokenizer_dir,
                            {"step": st.step, "val_loss": val, "kind": self.job.kind, **self.job.info}, state,
                            save_weights=saver)
            best = self.run.step_dir(st.best_step) if self.t.keep == "best" and st.best_step >= 0 else None
            self.run.retain(self.t.keep_last_n, keep=best)
            self.run.drop_replaced()  # this run has a checkpoint now: the one it replaced can go
        acc.wait_for_everyone()
        return folder

    def finish(self) -> TrainResult:
        """The last checkpoint if the last step has none; on a normal end, `final/` and the DDP check."""
        self.settle()
        st, acc = self.state, self.acc
        ckpts = self.run.checkpoints()
        if not ckpts or ckpts[-1][0] != st.step:
            self.checkpoint(st.last_val)
        best_val = st.best_val if st.best_val < math.inf else None
        if self.main:
            self.log.plot(force=True)
        if st.stop_requested:
            self.say(f"interrupted: saved a checkpoint at step {st.step}; continue with "
                     f"`llmgen {self.job.kind} --resume` (same --config/--set)")
            return TrainResult(self.run.path, None, st.step, best_val, interrupted=True, skipped_steps=st.skipped)
        if acc.num_processes > 1 and not self.fsdp:
            checksum = dist.check_ranks_in_sync(acc, self.net)
            self.say(f"{acc.num_processes} ranks in sync (weight checksum {checksum:.6f})")
        if self.main:
            best = self.run.step_dir(st.best_step)
            chosen = best if self.t.keep == "best" and st.best_step >= 0 else self.run.checkpoints()[-1][1]
            self.run.publish_final(chosen)
        acc.wait_for_everyone()
        rate = self.tokens_per_step * (st.step - self.start_step) / max(time.perf_counter() - self.t_start, 1e-9)
        return TrainResult(self.run.path, self.run.path / "final", st.step, best_val, stopped_early=st.stopped_early,
                           skipped_steps=st.skipped, tokens_per_s=rate, peak_memory_mb=dist.peak_memory_mb(acc.device))


def defer_nonfinite_check(acc, optimizer) -> bool:
    """Whether non-finite losses are skipped on the device (a GPU and a fused optimizer, no fp16 loss
    scaling, which drives the same input itself): the host then never waits for a step to finish."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return acc.device.type == "cuda" and bool(inner.defaults.get("fused")) and str(acc.mixed_precision) != "fp16"


def train(cfg: Config, model: torch.nn.Module, job: TrainJob, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train `model` as `job` describes; returns where the final checkpoint is. The run directory is
    locked for the whole run (by the first rank of a distributed run)."""
    first_rank = int(os.environ.get("RANK", "0")) == 0
    with exclusive(Path(cfg.run_dir), "run_dir") if first_rank else contextlib.nullcontext():
        return _train(cfg, model, job, resume, overwrite)


def _train(cfg: Config, model: torch.nn.Module, job: TrainJob, resume: bool, overwrite: bool) -> TrainResult:
    tr = Trainer(cfg, model, job, resume, overwrite)
    t, st, acc = cfg.train, tr.state, tr.acc
    tr.say(f"{job.kind}: {tr.net.num_params() / 1e6:.2f}M parameters, {tr.flops_per_token / 1e6:.1f} MFLOPs/token, "
           f"{tr.tokens_per_step:,} tokens/step, {acc.num_processes} process(es) on {acc.device}, precision "
           f"{'fp32' if acc.mixed_precision == 'no' else str(acc.mixed_precision) + ' autocast'} ({tr.precision_why})"
           + (", FSDP-sharded" if tr.fsdp else "") + (f", {tr.kernels}" if tr.kernels else "")
           + f"; matmul peak {tr.peak / 1e9:.0f} GFLOP/s")

    def on_sigint(signum, frame):  # Ctrl-C: finish the step, save, exit 0; a second one aborts at once
        if st.stop_requested:
            raise KeyboardInterrupt
        st.stop_requested = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    tr.model.train()
    tr.t_start = t_last = time.perf_counter()
    tokens_since = 0
    try:
        with ui.progress(job.kind, t.max_steps, unit="steps", enabled=tr.main) as bar:
            bar.advance(st.step)
            while st.step < t.max_steps and not st.stop_requested and not st.stopped_early:
                lr = tr.set_lr(st.step)
                loss_sum = tr.train_step(st.step)
                st.step += 1
                tokens_since += tr.tokens_per_step
                bar.advance(1)

                if st.step % t.log_every == 0 or st.step == t.max_steps:
                    tr.settle()
                    loss = acc.reduce(loss_sum / t.grad_accum_steps, reduction="mean").item()
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    mfu = tps * tr.flops_per_token / (tr.peak * acc.num_processes)
                    if tr.main:
                        tr.log.log({"step": st.step, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(tps, 1),
                                    "mfu": round(mfu, 4), "elapsed_s": round(now - tr.t_start, 2)})
                        bar.update(info=f"loss {loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s MFU {mfu:.1%}")

                if job.eval_sets and (st.step % t.eval_every == 0 or st.step == t.max_steps):
                    improved = tr.record_eval(tr.evaluate())
                    if improved:
                        st.best_step = st.step
                    if improved or st.step % t.save_every == 0 or st.step == t.max_steps:
                        tr.checkpoint(st.last_val)
                    if t.early_stopping_patience and st.bad_evals >= t.early_stopping_patience:
                        st.stopped_early = True
                        tr.say(f"early stopping: no val improvement in {st.bad_evals} evals")
                elif st.step % t.save_every == 0:
                    tr.checkpoint(None)
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if tr.log is not None:
            tr.log.close()
    return tr.finish()

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmgen.config import load_config
from llmgen.data.prepare import prepare
from llmgen.data.shards import TokenShards, WindowSampler
from llmgen.errors import LlmgenError
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import list_checkpoints, load_weights, read_model_config
from llmgen.model.transformer import Transformer
from llmgen.train import logging as runlog
from llmgen.train import loop
from llmgen.train.loop import TrainJob, train
from llmgen.train.optim import lr_at
from llmgen.train.pretrain import pretrain

TINY = ["model.preset=tiny", "model.d_model=64", "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32",
        "train.log_every=1", "train.eval_steps=2", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = load_config(None, [f"data.prepared_dir={root / 'data'}", "data.builtin_documents=300",
                             "tokenizer.vocab_size=400"])
    prepare(cfg)
    return root / "data"


def overrides(prepared, run_dir, *extra):
    return [f"data.prepared_dir={prepared}", f"run_dir={run_dir}", *TINY, *extra]


def losses(run_dir):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_loss_decreases_and_outputs(prepared, tmp_path):
    cfg = load_config(None, overrides(prepared, tmp_path / "run", "train.max_steps=30", "train.eval_every=15",
                                      "train.lr=3e-3"))
    res = pretrain(cfg)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert sum(list(curve.values())[-5:]) / 5 < sum(list(curve.values())[:5]) / 5 - 0.5
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "final/model.safetensors", "final/config.json",
                 "final/tokenizer.json"):
        assert (run / name).is_file(), name
    assert not (run / "final" / "training_state").exists()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30] and all(r["val_bpb"] > 0 for r in val)
    assert res.final_dir == run / "final"


def test_checkpoint_round_trip(prepared, tmp_path):
    cfg = load_config(None, overrides(prepared, tmp_path / "run", "train.max_steps=4", "train.eval_every=4"))
    pretrain(cfg)
    mcfg, meta = read_model_config(tmp_path / "run" / "final")
    assert meta["llmgen_version"] and meta["step"] == 4
    model = Transformer(mcfg)
    load_weights(model, tmp_path / "run" / "final")
    step_dir = list_checkpoints(tmp_path / "run")[-1][1]
    other = Transformer(mcfg)
    load_weights(other, step_dir)
    x = torch.randint(0, mcfg.vocab_size, (2, 16))
    assert torch.equal(model.eval()(x)[0], other.eval()(x)[0])
    state = torch.load(step_dir / "training_state" / "state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "rng" in state


def test_keep_last_n_prunes(prepared, tmp_path):
    cfg = load_config(None, overrides(prepared, tmp_path / "run", "train.max_steps=8", "train.eval_every=100",
                                      "train.save_every=2", "train.keep_last_n=2", "train.keep=last"))
    pretrain(cfg)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [6, 8]


def test_refusals(prepared, tmp_path):
    with pytest.raises(LlmgenError, match="run `llmgen prepare`"):
        pretrain(load_config(None, [f"data.prepared_dir={tmp_path / 'none'}", f"run_dir={tmp_path / 'r'}"]))
    with pytest.raises(LlmgenError, match="model.vocab_size = 999 but the tokenizer"):
        pretrain(load_config(None, overrides(prepared, tmp_path / "r", "model.vocab_size=999")))
    with pytest.raises(LlmgenError, match="train.seq_len = 128 is longer than model.max_seq_len = 64"):
        pretrain(load_config(None, overrides(prepared, tmp_path / "r", "train.seq_len=128")))
    cfg = load_config(None, overrides(prepared, tmp_path / "r", "train.max_steps=2"))
    pretrain(cfg)
    with pytest.raises(LlmgenError, match="already holds a run; pass --resume"):
        pretrain(cfg)
    pretrain(cfg, overwrite=True)  # explicit start-over works
    with pytest.raises(LlmgenError, match="different model shape"):
        pretrain(load_config(None, overrides(prepared, tmp_path / "r", "train.max_steps=4", "model.n_layer=3")),
                 resume=True)


def test_nonfinite_loss_stops_without_checkpoint(prepared, tmp_path):
    cfg = load_config(None, overrides(prepared, tmp_path / "run", "train.max_steps=20", "train.lr=1e30",
                                      "train.min_lr=0", "train.grad_clip=0", "train.warmup_steps=0",
                                      "train.save_every=1", "train.eval_every=100"))
    with pytest.raises(LlmgenError, match="(the loss became (nan|inf)|the weights became non-finite)"):
        pretrain(cfg)
    for _, folder in list_checkpoints(tmp_path / "run"):
        model = Transformer(read_model_config(folder)[0])
        load_weights(model, folder)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("on_device", [False, True], ids=["checked-each-step", "skipped-on-device"])
def test_skip_nonfinite_counts_and_keeps_weights_finite(prepared, tmp_path, monkeypatch, on_device):
    """A batch whose loss is NaN is skipped (no update) and counted, with train.skip_nonfinite; the same
    when the fused optimizer skips it on the device and the loop reads that later (GPU runs)."""
    monkeypatch.setattr(loop, "defer_nonfinite_check", lambda acc, opt: on_device)

    class Poisoned(Transformer):
        def forward(self, idx, **kw):
            out = super().forward(idx, **kw)
            return out * float("nan") if bool(idx.eq(7).all()) else out

    shards = TokenShards(prepared)
    cfg = load_config(None, overrides(prepared, tmp_path / "run", "train.max_steps=6", "train.eval_every=100",
                                      "train.skip_nonfinite=true", f"model.vocab_size={shards.vocab_size}"))
    sampler = WindowSampler(shards.tokens("train"), 4, 32, 0)

    def batches(step, micro, rank):
        x, y = sampler(step, micro, rank)
        return (torch.full_like(x, 7), y) if step in (2, 4) else (x, y)

    res = train(cfg, Poisoned(cfg.model), TrainJob("pretrain", batches, {}, prepared))
    assert res.skipped_steps == 2 and res.step == 6
    model = Transformer(read_model_config(res.final_dir)[0])
    load_weights(model, res.final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    cfg.train.skip_nonfinite = False
    with pytest.raises(LlmgenError, match="the loss became nan at step 2"):
        train(cfg, Poisoned(cfg.model), TrainJob("pretrain", batches, {}, prepared), overwrite=True)


def test_lr_schedules():
    cfg = load_config(None, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"])
    t = cfg.train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(0.55)  # cosine midpoint
    lin = load_config(None, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1",
                             "train.schedule=linear"]).train
    assert lr_at(55, lin) == pytest.approx(0.55)
    wsd = load_config(None, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1",
                             "train.schedule=wsd"]).train
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.55)


def _cli_cmd(args):
    return [sys.executable, "-m", "llmgen", "pretrain", *[a for o in args for a in ("--set", o)]]


@pytest.mark.slow
def test_resume_after_kill_reproduces_losses(prepared, tmp_path):
    common = ["train.max_steps=40", "train.save_every=5", "train.eval_every=20", "model.dropout=0.1"]
    ref = load_config(None, overrides(prepared, tmp_path / "ref", *common))
    pretrain(ref)
    want = losses(tmp_path / "ref")

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli_cmd(overrides(prepared, run, *common)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step-10").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in list_checkpoints(run)]
    assert done and done[-1] < 40, "the run finished before it could be killed"
    res = pretrain(load_config(None, overrides(prepared, run, *common)), resume=True)
    assert res.step == 40
    assert losses(run) == want  # exactly, step by step, including the steps before the kill


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_0(prepared, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_cmd(overrides(prepared, run, "train.max_steps=100000", "train.eval_every=100000",
                                               "train.save_every=100000")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume" in err
    assert list_checkpoints(run)


@pytest.mark.slow
def test_two_process_gloo_run(prepared, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmgen",
           "pretrain", *[a for o in overrides(prepared, run, "train.max_steps=6", "train.eval_every=3")
                         for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stderr and "2 ranks in sync" in proc.stderr
    assert proc.stderr.count("done: 6 steps") == 1  # only rank 0 reports
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]


@pytest.mark.slow
def test_two_process_fsdp_resume_matches_uninterrupted(prepared, tmp_path):
    """FSDP (train.distributed: fsdp) over 2 gloo processes: checkpoints hold the full, gathered
    weights, and a run resumed from one reproduces the uninterrupted run's losses."""
    def launch(run, *extra):
        sets = overrides(prepared, run, "train.eval_every=3", "train.distributed=fsdp", *extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmgen",
               "pretrain", *[a for o in sets for a in ("--set", o)]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "FSDP-sharded" in proc.stderr
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    full = launch(tmp_path / "full", "train.max_steps=6")
    launch(tmp_path / "cut", "train.max_steps=3")
    resumed = launch(tmp_path / "cut", "train.max_steps=6", "train.resume=auto")
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(full)
    lm = load_model(str(tmp_path / "full" / "final"))  # a plain checkpoint any command can load
    assert lm.model.num_params() > 0


def test_loss_chart_is_redrawn_at_most_every_30_s(tmp_path, monkeypatch):
    """loss.png: drawing it costs ~0.2 s, so evaluations redraw it only when the last chart is
    PLOT_EVERY_S old; the end of a run (`force`) always draws the latest curve."""
    clock = [1000.0]
    monkeypatch.setattr(runlog.time, "monotonic", lambda: clock[0])
    log = runlog.RunLog(tmp_path)
    log.log({"step": 1, "loss": 3.0})
    log.plot()
    assert not (tmp_path / "loss.png").exists()  # too soon after the start
    clock[0] += runlog.RunLog.PLOT_EVERY_S
    log.plot()
    first = (tmp_path / "loss.png").read_bytes()
    log.log({"step": 2, "loss": 2.0, "val_loss": 2.5})
    clock[0] += 1
    log.plot()
    assert (tmp_path / "loss.png").read_bytes() == first  # throttled
    log.plot(force=True)
    assert (tmp_path / "loss.png").read_bytes() != first


def test_clipping_inside_the_fused_optimizer_equals_accelerates(prepared, tmp_path, monkeypatch):
    """train.grad_clip folded into the fused AdamW (its grad_scale input) trains exactly as accelerate's
    clip_grad_norm_ before a plain AdamW; a run without the clip differs, so the clip was biting."""
    def run(name, clip):
        pretrain(load_config(None, overrides(prepared, tmp_path / name, "train.max_steps=8", "train.eval_every=100",
                                             "train.lr=3e-3", f"train.grad_clip={clip}",
                                             "train.mixed_precision=fp32")))  # bf16 rounding would hide 1e-5
        return list(losses(tmp_path / name).values())

    folded, unclipped = run("folded", 0.05), run("unclipped", 0)
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda model, t, device, *rest: real(model, t, "unfused", *rest))
    plain = run("plain", 0.05)
    assert folded == pytest.approx(plain, rel=1e-5)
    assert max(abs(a - b) for a, b in zip(folded, unclipped)) > 1e-3

"""Precision is measured on the machine, not assumed: the probe, bf16 training on a CPU, bf16 decoding."""

from __future__ import annotations

import json

import pytest
import torch

from llmgen.config import EngineOptions, GenerateConfig, ModelConfig, load_config
from llmgen.data.shards import WindowSampler
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.generate.engine import Engine
from llmgen.kernels import precision
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer
from llmgen.train import distributed
from llmgen.train.loop import TrainJob, train


@pytest.mark.parametrize("speedup,want", [(6.1, torch.bfloat16), (1.2, torch.float32), (0.03, torch.float32)])
def test_auto_picks_bf16_only_where_it_is_clearly_faster(monkeypatch, speedup, want):
    monkeypatch.setattr(precision, "matmul_speedup", lambda device, dtype: speedup)
    dtype, why = precision.choose_dtype(torch.device("cpu"))
    assert dtype == want and f"bf16 matmul {speedup:.2f}x fp32 on this CPU" == why
    mode, why = distributed.mixed_precision_mode("auto")
    assert mode == ("bf16" if want == torch.bfloat16 else "no") and "x fp32" in why
    assert precision.choose_dtype(torch.device("cpu"), "fp16") == (torch.float16, "as asked")
    assert distributed.mixed_precision_mode("fp32") == ("no", "as configured")


def test_the_probe_measures_this_machine_quickly():
    precision.matmul_speedup.cache_clear()
    import time

    t0 = time.perf_counter()
    speedup = precision.matmul_speedup("cpu", torch.bfloat16)
    assert speedup > 0 and time.perf_counter() - t0 < 2.0


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                                   vocab_size=260))


def test_bf16_autocast_training_step_on_the_cpu_lowers_the_loss(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog. " * 400).encode()
    tokens = torch.tensor(list(text)).numpy()
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.mixed_precision=bf16", "train.max_steps=12",
                             "train.batch_size=2", "train.seq_len=16", "train.lr=1e-2", "train.warmup_steps=2",
                             "train.log_every=1", "train.eval_every=1000", "train.save_every=1000"])
    bytes_tokenizer().save(tmp_path / "tok")
    res = train(cfg, tiny(), TrainJob("pretrain", WindowSampler(tokens, 2, 16, 0), {}, tmp_path / "tok"))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert res.step == 12 and losses[-1] < losses[0] - 0.5, losses


def test_bf16_decoding_tracks_fp32():
    model = tiny()
    tok = bytes_tokenizer()
    fp32 = Engine(tiny(), tok, options=EngineOptions(device="cpu", dtype="fp32"))
    bf16 = Engine(model, tok, options=EngineOptions(device="cpu", dtype="bf16"))
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert "bf16 (as asked)" in bf16.describe()
    ids = torch.randint(0, 260, (1, 20))
    with torch.no_grad():
        a, b = fp32.model(ids).float(), bf16.model(ids).float()
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.05
    out = bf16.generate(["Hello"], GenerateConfig(max_new_tokens=8, temperature=0.0))
    assert len(out[0][0].tokens) == 8 and out.stats.new_tokens == 8


@pytest.mark.parametrize("bf16_s,fp16_s,quantize,want", [
    (1.0, 2.0, None, torch.float32),       # a machine with faster bf16 matmuls and slow bf16 one-row products
    (0.5, 0.25, "none", torch.bfloat16),   # ... where bf16 beats the fp32 path (fp16 weights not asked for)
    (0.5, 1.0, None, torch.bfloat16),      # ... and one where bf16 decodes fastest
    (0.5, 1.0, "int4", torch.float32),     # the int4 kernels take fp32 activations
])
def test_auto_dtype_for_decoding_is_measured_on_one_row_products(monkeypatch, bf16_s, fp16_s, quantize, want):
    """dtype auto on a CPU whose bf16 matmuls are faster: decoding is bound by reading the weights, so bf16 is
    kept only where its one-row product beats the fp32-activation paths (fp32, or fp16 weights where they would
    be used); scoring perplexity batches keeps the full-matmul choice."""
    from llmgen.kernels import blockwise, fp16_weights

    if quantize == "int4" and blockwise.missing():
        pytest.skip(blockwise.missing())
    monkeypatch.setattr(precision, "matmul_speedup", lambda device, dtype: 2.2)
    monkeypatch.setattr(fp16_weights, "decode_seconds", lambda bf16=False: {"fp32": 1.0, "fp16": fp16_s, "bf16": bf16_s})
    e = Engine(tiny(), bytes_tokenizer(), options=EngineOptions(device="cpu", quantize=quantize))
    assert e.dtype == want and next(e.model.parameters()).dtype == want
    if quantize is None:
        assert f"bf16 decode matmul {min(1.0, fp16_s) / bf16_s:.2f}x {'fp16' if fp16_s < 1 else 'fp32'}" in e.describe()
    score = Engine(tiny(), bytes_tokenizer(), options=EngineOptions(device="cpu", quantize="none", work="score"))
    assert score.dtype == torch.bfloat16 and "decode matmul" not in score.describe()


def test_decode_probe_times_every_path_quickly():
    from llmgen.kernels import fp16_weights
    import time

    fp16_weights._timed.clear()
    assert fp16_weights.decode_seconds()["bf16"] == float("inf")  # not timed unless asked: no start-up cost
    t0 = time.perf_counter()
    t = fp16_weights.decode_seconds(bf16=True)
    assert time.perf_counter() - t0 < 2.0
    assert 0 < t["fp32"] < 1 and 0 < t["bf16"] < 1 and (t["fp16"] < 1) == fp16_weights.available()
    assert fp16_weights.decode_seconds() == t  # kept for the process


def test_cli_dtype_flag_and_json_record(cli, tmp_path):
    tok_dir = tmp_path / "tok"
    bytes_tokenizer().save(tok_dir)
    save_checkpoint(tmp_path / "ckpt", tiny(), tok_dir, {"step": 0})
    code, out, err = cli("generate", "Hi", "--model", tmp_path / "ckpt", "-n", "4", "--dtype", "bf16", "--json")
    assert code == 0, err
    assert "bf16 (as asked)" in json.loads(out)["engine"] and "bf16 (as asked)" in err
    code, _, err = cli("generate", "Hi", "--model", tmp_path / "ckpt", "--dtype", "fp8")
    assert code == 2 and "generate.dtype" in err


def test_cpu_name_tells_machine_kinds_apart():
    """Benchmark tables and the compile timings key on the CPU: VMs report "AMD EPYC" for Zen 3 and Zen 4 alike,
    so the family/model numbers and the extensions that decide the fast paths come with the name."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file() or "model name" not in info.read_text():
        pytest.skip("no /proc/cpuinfo model name here")
    name = precision.cpu_name()
    model = next(x.split(":", 1)[1].strip() for x in info.read_text().splitlines() if x.startswith("model name"))
    assert name.startswith(model + " (family ") and "model " in name.split("(", 1)[1]

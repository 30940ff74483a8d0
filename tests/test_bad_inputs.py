"""Every bad input, fault and hostile file a user can meet gets one clear line and loses nothing.

Each case runs the real CLI (in-process, `llmgen.cli.main`) and checks the exit code, that stderr
carries exactly one `error:` line and no traceback, that the line names the problem, and that the
files that were there before are byte-identical after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmgen.atomic import clean_stale, exclusive
from llmgen.cli import main
from llmgen.config import ModelConfig
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under the given folders (hidden ones included), by path."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                out[str(p)] = p.read_bytes()
    return out


def expect_error(result, *needles: str) -> str:
    """Exit 2, one `error:` line naming every needle, no traceback; returns that line."""
    code, _, err = result
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Evil:
    """A pickle that runs a command when loaded: llmgen must refuse to load it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_checkpoint(folder: Path, **over) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(preset=None, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=64,
                                vocab_size=260), **over})
    tok_dir = folder.parent / "_tok"
    bytes_tokenizer().save(tok_dir)
    save_checkpoint(folder, Transformer(cfg), tok_dir, {"step": 0})
    return folder


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "run" / "final")


# ------------------------------------------------------------------------------------ config

CONFIG_CASES = [  # (--set overrides, words the error line must contain)
    (["train.lr=.nan"], ["train.lr", "not a finite number", "> 0"]),
    (["train.lr=.inf"], ["train.lr", "not a finite number"]),
    (["train.lr=-.inf"], ["train.lr", "not a finite number"]),
    (["train.min_lr=.nan"], ["train.min_lr", "finite", ">= 0.0"]),
    (["data.val_fraction=.nan"], ["data.val_fraction", "finite", "<= 0.5"]),
    (["model.dropout=.nan"], ["model.dropout", "finite"]),
    (["train.weight_decay=.nan"], ["train.weight_decay", "finite"]),
    (["train.grad_clip=.inf"], ["train.grad_clip", "finite"]),
    (["train.beta1=.nan"], ["train.beta1", "finite"]),
    (["generate.temperature=.nan"], ["generate.temperature", "finite"]),
    (["generate.top_p=.nan"], ["generate.top_p", "finite"]),
    (["generate.presence_penalty=.inf"], ["generate.presence_penalty", "finite"]),
    (["finetune.lr=.inf"], ["finetune.lr", "finite"]),
    (["model.rope_theta=.inf"], ["model.rope_theta", "finite"]),
    (["model.norm_eps=.nan"], ["model.norm_eps", "finite"]),
    (["train.lr=1e-3", "train.min_lr=1e-2"], ["train.min_lr", "larger than train.lr"]),
    (["train.max_steps=ten"], ["train.max_steps", "not an integer"]),
    (["train.max_stesp=10"], ["unknown key train.max_stesp", "did you mean 'max_steps'"]),
    (["model.preset=huge"], ["model.preset 'huge' is unknown"]),
    (["model.n_head=3"], ["model.d_model (128 (from model.preset quickstart", "model.n_head (3)"]),
    (["model.n_kv_head=3"], ["model.n_head (4 (from model.preset quickstart", "model.n_kv_head (3)"]),
    (["train.max_steps"], ["expected section.key=value"]),
    (["tokenizer.type=wordpiece"], ["tokenizer.type", "not one of"]),
]


@pytest.mark.parametrize("overrides,needles", CONFIG_CASES, ids=[c[0][-1] for c in CONFIG_CASES])
def test_bad_config_values(cli, tmp_path, overrides, needles):
    args = [a for o in overrides for a in ("--set", o)]
    expect_error(cli("prepare", "--set", f"data.prepared_dir={tmp_path / 'p'}", *args), *needles)
    assert not (tmp_path / "p").exists()


def test_bad_config_files(cli, tmp_path):
    expect_error(cli("prepare", "--config", tmp_path), "is a folder")
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    expect_error(cli("prepare", "--config", loop), "symbolic link")
    expect_error(cli("prepare", "--config", tmp_path / "none.yaml"), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    expect_error(cli("prepare", "--config", bad), "malformed YAML", "line")
    bad.write_text("- a\n- b\n")
    expect_error(cli("prepare", "--config", bad), "top level must be a mapping")
    bad.write_text("train:\n  lr: .nan\n")
    expect_error(cli("prepare", "--config", bad), str(bad), "train.lr", "finite")


def test_empty_config_and_head_count_without_kv_heads(cli, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, out, err = cli("prepare", "--config", empty, "--print-config")
    assert code == 0 and "is empty: running on the embedded quickstart defaults" in err
    code, out, err = cli("prepare", "--print-config", "--set", "model.n_head=2")
    assert code == 0 and "n_kv_head: null" in out  # follows n_head, not the preset's 4
    code, out, err = cli("prepare", "--print-config", "--set", "model.preset=tiny", "--set", "model.n_head=8")
    assert code == 0 and "n_head: 8" in out and "n_kv_head: null" in out


# ------------------------------------------------------------------------------------ generate

GENERATE_CASES = [  # (extra args, words)
    (["Hi", "--temperature", "nan"], ["generate.temperature", "finite"]),
    (["Hi", "--top-p", "nan"], ["generate.top_p", "finite"]),
    (["Hi", "--top-p", "1.5"], ["generate.top_p", "out of range"]),
    (["Hi", "--repetition-penalty", "inf"], ["generate.repetition_penalty", "finite"]),
    (["Hi", "--quantize", "int2"], ["generate.quantize", "int2"]),
    (["Hi", "--num-beams", "2", "--top-k", "5"], ["beam search is deterministic"]),
    (["Hi", "--num-beams", "2", "--num-return-sequences", "3"], ["exceeds num_beams"]),
    (["Hi", "--temperature", "0", "--num-return-sequences", "2"], ["same text every time"]),
    (["Hi", "--input-file", "x.jsonl", "--output-file", "o.jsonl"], ["either a PROMPT or --input-file"]),
    (["--input-file", "x.jsonl"], ["needs --output-file"]),
    (["--input-file", "missing.jsonl", "--output-file", "o.jsonl"], ["missing.jsonl", "file not found"]),
]


@pytest.mark.parametrize("args,needles", GENERATE_CASES, ids=[" ".join(c[0][:3]) for c in GENERATE_CASES])
def test_bad_generate_arguments(cli, ckpt, args, needles):
    before = snapshot(ckpt)
    expect_error(cli("generate", "--model", ckpt, *args), *needles)
    assert snapshot(ckpt) == before


def test_mistyped_flag_is_a_usage_error(cli, ckpt):
    code, _, err = cli("generate", "Hi", "--model", ckpt, "--max-new-tokns", "3")
    assert code == 2 and "Traceback" not in err and "--max-new-tokens" in err


def test_bad_prompt_files(cli, ckpt, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text('{"prompt": "a"}\n{oops\n')
    expect_error(cli("generate", "--model", ckpt, "--input-file", prompts, "--output-file", out), "p.jsonl:2",
                 "not valid JSON")
    prompts.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    expect_error(cli("generate", "--model", ckpt, "--input-file", prompts, "--output-file", out), "p.jsonl:2",
                 "`prompt`")
    prompts.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    expect_error(cli("generate", "--model", ckpt, "--input-file", prompts, "--output-file", out), "p.jsonl:1",
                 "unknown role 'robot'")
    assert not out.exists()


def test_output_file_of_another_prompt_file_is_refused(cli, ckpt, tmp_path):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "o.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"A{i}"}) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps({"prompt": f"B{i}"}) + "\n" for i in range(3)))
    args = ["--model", ckpt, "-n", "2", "--temperature", "0", "--output-file", out]
    assert cli("generate", "--input-file", a, *args)[0] == 0
    before = out.read_bytes()
    expect_error(cli("generate", "--input-file", b, *args), "answers another prompt", "b.jsonl record 1")
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------ eval, prepare and finetune data

def test_eval_reference_problems(cli, tmp_path):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"prediction": "a b", "reference": ""}) + "\n" for _ in range(3)))
    expect_error(cli("eval", "--predictions", pred, "--metrics", "bleu"), "all 3 references are empty")
    pred.write_text(json.dumps({"prediction": "a b", "reference": "a b"}) + "\n" + json.dumps({"prediction": "x"}))
    expect_error(cli("eval", "--predictions", pred, "--metrics", "bleu"), "pred.jsonl:2", "missing field `reference`")
    expect_error(cli("eval", "--predictions", tmp_path / "none.jsonl", "--metrics", "bleu"), "none.jsonl",
                 "file not found")
    pred.write_text(json.dumps({"prediction": "a b", "reference": "a b"}) + "\n" +
                    json.dumps({"prediction": "x", "reference": " "}) + "\n")
    code, _, err = cli("eval", "--predictions", pred, "--metrics", "bleu", "--output", tmp_path / "r.json")
    assert code == 0 and "1 of 2 references are empty" in err


def test_prepare_bad_data_keeps_the_prepared_folder(cli, tmp_path):
    good, out = tmp_path / "good.jsonl", tmp_path / "p"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    base = ["--set", f"data.prepared_dir={out}", "--set", "tokenizer.type=bytes"]
    assert cli("prepare", "--set", f"data.source={good}", *base)[0] == 0
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    expect_error(cli("prepare", "--set", f"data.source={bad}", *base), "bad.jsonl:2", "no text field 'text'",
                 "data.text_field")
    csv = tmp_path / "bad.csv"
    csv.write_text("body\nx\n")
    expect_error(cli("prepare", "--set", f"data.source={csv}", *base), "bad.csv:2", "no text field 'text'")
    expect_error(cli("prepare", "--set", f"data.source={tmp_path / 'none.txt'}", *base), "file not found")
    assert snapshot(out) == before


def test_finetune_data_that_fits_nothing_is_refused(cli, ckpt, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "x" * 200, "completion": "y"}) + "\n" for _ in range(6)))
    args = ["--set", f"finetune.base={ckpt}", "--set", f"finetune.datasets=[{{source: {data}}}]",
            "--set", "finetune.seq_len=32", "--set", f"run_dir={tmp_path / 'ft'}", "--set", "finetune.template=plain",
            "--set", "train.max_steps=3"]
    line = expect_error(cli("finetune", *args), "none of its 6 examples", "raise finetune.seq_len")
    code, _, err = cli("finetune", *args)
    assert "train.max_steps does not apply to finetune; it uses finetune.max_steps" in err and line in err
    assert not (tmp_path / "ft" / "finetune" / "checkpoints").exists()


# ------------------------------------------------------------------------------------ damaged and hostile checkpoints

def _damage_garbage_weights(c: Path) -> None:
    (c / "model.safetensors").write_bytes(b"garbage" * 10)


def _damage_config_json(c: Path) -> None:
    (c / "config.json").write_text('{"model": {"n_layer": 1,')


def _damage_config_shape(c: Path) -> None:
    meta = json.loads((c / "config.json").read_text())
    meta["model"]["d_model"] = 64
    (c / "config.json").write_text(json.dumps(meta))


def _damage_config_no_model(c: Path) -> None:
    (c / "config.json").write_text('{"step": 3}')


def _damage_missing_tokenizer(c: Path) -> None:
    (c / "tokenizer.json").unlink()


def _damage_tokenizer_config(c: Path) -> None:
    (c / "tokenizer_config.json").write_text("{not json")


def _damage_missing_weights(c: Path) -> None:
    (c / "model.safetensors").unlink()


CHECKPOINT_CASES = [
    (_damage_garbage_weights, ["model.safetensors", "cannot be read as safetensors", "damaged"]),
    (_damage_config_json, ["config.json", "not valid JSON"]),
    (_damage_config_shape, ["config.json disagree", "model.safetensors"]),
    (_damage_config_no_model, ["config.json", "no `model` section"]),
    (_damage_missing_tokenizer, ["tokenizer.json is missing"]),
    (_damage_tokenizer_config, ["tokenizer_config.json", "not valid JSON"]),
    (_damage_missing_weights, ["model.safetensors is missing"]),
]


@pytest.mark.parametrize("damage,needles", CHECKPOINT_CASES, ids=[c[0].__name__[8:] for c in CHECKPOINT_CASES])
def test_damaged_checkpoints(cli, ckpt, damage, needles):
    damage(ckpt)
    before = snapshot(ckpt)
    expect_error(cli("generate", "Hi", "--model", ckpt, "-n", "2"), *needles)
    assert snapshot(ckpt) == before


def test_hostile_chat_template_is_stopped(cli, ckpt, tmp_path):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    expect_error(cli("generate", "--model", ckpt, "--input-file", prompts, "--output-file", tmp_path / "o.jsonl"),
                 "chat template was stopped", "sandbox")
    assert not (tmp_path / "o.jsonl").exists()


def _hf_folder(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_object=bytes_tokenizer().tok, eos_token="<|endoftext|>").save_pretrained(src)
    return src


def test_hf_folder_with_remote_code_is_refused(cli, tmp_path):
    src = _hf_folder(tmp_path)
    meta = json.loads((src / "config.json").read_text())
    meta["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(meta))
    before = snapshot(src)
    expect_error(cli("import", src, "--output", tmp_path / "out"), "refused", "custom Python code", "auto_map")
    assert snapshot(src) == before and not (tmp_path / "out").exists()


def test_hostile_pickle_weights_are_refused(cli, tmp_path):
    src = _hf_folder(tmp_path)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Evil(marker)}, src / "pytorch_model.bin")
    line = expect_error(cli("import", src, "--output", tmp_path / "out"), "refused", "could run code")
    assert "weights_only=False" not in line and not marker.exists()


# ------------------------------------------------------------------------------------ runs: resume, locks, leftovers

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrain run with checkpoints at steps 2 and 4 (tiny model, bytes tokenizer)."""
    root = tmp_path_factory.mktemp("run")
    args = ["--set", f"data.prepared_dir={root / 'data'}", "--set", f"run_dir={root / 'run'}",
            "--set", "data.builtin_documents=200", "--set", "tokenizer.type=bytes", "--set", "model.preset=tiny",
            "--set", "model.d_model=32", "--set", "model.max_seq_len=64", "--set", "train.batch_size=2",
            "--set", "train.seq_len=32", "--set", "train.max_steps=4", "--set", "train.save_every=2",
            "--set", "train.eval_every=2", "--set", "train.eval_steps=1", "--set", "train.keep=last"]
    for cmd in ("prepare", "pretrain"):
        with pytest.raises(SystemExit) as e:
            main([cmd, *args])
        assert e.value.code == 0
    return root, args


@pytest.fixture
def run_copy(trained, tmp_path):
    root, args = trained
    shutil.copytree(root, tmp_path / "r")
    args = [a.replace(str(root), str(tmp_path / "r")) for a in args]
    return tmp_path / "r" / "run", args


def _cut_state(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", ["truncated", "empty", "hostile"])
def test_resume_skips_a_damaged_training_state(cli, run_copy, tmp_path, damage):
    run, args = run_copy
    state = run / "checkpoints" / "step-4" / "training_state" / "state.pt"
    marker = tmp_path / "pwned"
    {"truncated": lambda: _cut_state(state), "empty": lambda: state.write_bytes(b""),
     "hostile": lambda: torch.save({"step": 4, "rng": Evil(marker)}, state)}[damage]()
    code, _, err = cli("pretrain", *args, "--set", "train.max_steps=6", "--resume")
    assert code == 0, err
    assert str(state) in err and "resuming from" in err and "step-2" in err and not marker.exists()
    assert ("could run code" in err) == (damage == "hostile") and "weights_only=False" not in err


def test_resume_with_every_state_damaged_says_so(cli, run_copy):
    run, args = run_copy
    for step in (2, 4):
        _cut_state(run / "checkpoints" / f"step-{step}" / "training_state" / "state.pt")
    before = snapshot(run)
    expect_error(cli("pretrain", *args, "--resume"), "could be loaded", "--overwrite")
    assert snapshot(run) == before


def test_a_second_process_on_a_run_dir_is_refused(cli, run_copy):
    run, args = run_copy
    before = snapshot(run)
    with exclusive(run, "run_dir"):  # as if another llmgen process were training in it
        expect_error(cli("pretrain", *args, "--set", "train.max_steps=6", "--resume"), "in use by another llmgen",
                     f"pid {os.getpid()}")
    assert snapshot(run) == before
    code, _, err = cli("pretrain", *args, "--set", "train.max_steps=6", "--resume")  # the lock is free again
    assert code == 0, err


def test_a_second_prepare_of_one_folder_is_refused(cli, run_copy):
    run, args = run_copy
    data = run.parent / "data"
    before = snapshot(data)
    with exclusive(data, "data.prepared_dir"):
        expect_error(cli("prepare", *args, "--force"), "in use by another llmgen", "data.prepared_dir")
    assert snapshot(data) == before


def test_a_lock_left_by_a_killed_process_is_taken_over(cli, run_copy):
    run, args = run_copy
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom llmgen.atomic import exclusive\n"
                               f"with exclusive(__import__('pathlib').Path({str(run)!r}), 'run_dir'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    expect_error(cli("pretrain", *args, "--set", "train.max_steps=6", "--resume"), f"pid {holder.pid}")
    holder.kill()
    holder.wait()
    code, _, err = cli("pretrain", *args, "--set", "train.max_steps=6", "--resume")
    assert code == 0, err


def test_leftovers_of_a_killed_writer_are_cleaned_or_restored(cli, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    target = tmp_path / "exported"
    (tmp_path / f".exported.tmp-{dead.pid}").mkdir()
    (tmp_path / f".exported.tmp-{dead.pid}" / "half.bin").write_bytes(b"x" * 1000)
    (tmp_path / f".exported.old-{dead.pid}").mkdir()
    (tmp_path / f".exported.old-{dead.pid}" / "good.bin").write_bytes(b"good")
    clean_stale(target)  # killed between moving the old export aside and renaming the new one in
    assert (target / "good.bin").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_overwrite_keeps_the_old_copy_when_writing_fails(cli, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    assert cli("export", ckpt, "--output", out)[0] == 0
    before = snapshot(out)

    def full_disk(self, *args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk)
    expect_error(cli("export", ckpt, "--output", out, "--overwrite"), "no space left", str(out),
                 "previous files there are intact")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == []


# ------------------------------------------------------------------------------------ full disk (tmpfs, root only)

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_prepare_on_a_full_disk(cli, small_disk):
    out = small_disk / "data"
    code, _, err = cli("prepare", "--set", f"data.prepared_dir={out}", "--set", "tokenizer.type=bytes",
                       "--set", "data.builtin_documents=4000")
    expect_error((code, "", err), "no space left", "free some space")
    assert not out.exists() and list(small_disk.iterdir()) == []


def test_checkpoint_on_a_full_disk_keeps_the_earlier_ones(cli, small_disk, trained):
    root, args = trained
    run = small_disk / "run"
    shutil.copytree(root / "run" / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
    args = [a.replace(str(root / "run"), str(run)) for a in args]
    before = snapshot(run)
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * max(0, free - 150_000))  # room for the logs, not for a checkpoint
    expect_error(cli("pretrain", *args, "--resume"), "no space left", "intact", "a checkpoint of this run takes about")
    filler.unlink()
    assert {k: v for k, v in snapshot(run).items() if "/checkpoints/step-2/" in k} == before


def test_promises_are_in_the_readme():
    readme = (REPO / "README.md").read_text()
    assert "## What llmgen promises" in readme


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(cli, run_copy):
    run, args = run_copy
    old = {k.replace(str(run), ""): v for k, v in snapshot(run / "checkpoints", run / "final").items()}
    bad = ["--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0"]
    expect_error(cli("pretrain", *args, *bad, "--overwrite"), "non-finite")  # fails before its first checkpoint
    kept = run / ".replaced-run"
    assert {k.replace(str(kept), ""): v for k, v in snapshot(kept / "checkpoints", kept / "final").items()} == old
    code, _, err = cli("generate", "Hi", "--model", run, "-n", "2")
    assert code == 2 and "no checkpoint" in err  # the kept run is not picked up as the run's model
    code, _, err = cli("pretrain", *args, "--overwrite")
    assert code == 0, err
    assert not kept.exists() and "removed the previous run" in err

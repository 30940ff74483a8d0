"""Finetuning: loss masks, packing, freezing, layer-wise LR, LoRA, mixtures, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmgen.config import ModelConfig
from llmgen.data.chat_format import PromptFormat
from llmgen.data.instruct import encode_conversation
from llmgen.data.tokenizer import Tokenizer, bytes_tokenizer
from llmgen.interop.load import load_model
from llmgen.model.checkpoint import read_model_config, save_checkpoint
from llmgen.model.transformer import Transformer
from llmgen.data.sft import SFTBatches, TaskData, encode_examples, pack_row, segment_mask
from llmgen.train.optim import param_groups

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Bob."}]


def _base(tmp_path: Path, chat_template: bool = True, n_layer: int = 3) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=None, n_layer=n_layer, n_head=2, d_model=32, max_seq_len=128, vocab_size=260))
    tok = bytes_tokenizer()
    if not chat_template:
        tok = Tokenizer(tok.tok, chat_template=None, kind="bytes")
    tok.save(tmp_path / "tok")
    folder = tmp_path / "base"
    save_checkpoint(folder, model, tmp_path / "tok", {"step": 0})
    return folder


def _data(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ft_args(base, data, run, *extra):
    return ["finetune", "--set", f"finetune.base={base}", "--set", f"finetune.run_dir={run}",
            "--set", f"finetune.datasets=[{{source: {data}, format: prompt_completion}}]",
            "--set", "finetune.max_steps=4", "--set", "finetune.eval_every=2", "--set", "finetune.batch_size=4",
            "--set", "train.eval_steps=2", "--set", "finetune.seq_len=64", *extra]


@pytest.mark.parametrize("name", ["chat_template", "chatml", "alpaca", "plain"])
def test_loss_mask_covers_exactly_the_replies(name):
    tok = bytes_tokenizer()
    fmt = PromptFormat(name)
    ids, mask = encode_conversation(tok, fmt, CHAT)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    ends = {"chat_template": "<|im_end|>\n", "chatml": "<|im_end|>", "alpaca": "<|endoftext|>", "plain": "<|endoftext|>"}[name]
    assert trained == "Hello!" + ends + "Bob." + ends
    prompt_only = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Hi?" in prompt_only and "Name?" in prompt_only and "Hello!" not in prompt_only
    # the generation prompt is exactly the masked prefix before the last reply
    gen = tok.encode(fmt.prompt(tok, CHAT[:-1]), specials=True)
    assert ids[:len(gen)] == gen and not mask[len(gen) - 1]
    assert tok.decode([i for i, m in zip(ids[len(gen):], mask[len(gen):]) if m]) == "Bob." + ends


def test_packing_keeps_examples_apart():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=260)).eval()
    a = (np.arange(10, 22), np.arange(11, 23))
    b = (np.arange(40, 47), np.arange(41, 48))
    ids, tgt, pos, seg = pack_row([a, b], 32, 0)
    with torch.no_grad():
        packed = model(torch.from_numpy(ids)[None], attn_mask=segment_mask(torch.from_numpy(seg)[None]),
                          positions=torch.from_numpy(pos)[None])
        alone_a = model(torch.from_numpy(a[0])[None])
        alone_b = model(torch.from_numpy(b[0])[None])
    assert torch.allclose(packed[0, :12], alone_a[0], atol=1e-5)
    assert torch.allclose(packed[0, 12:19], alone_b[0], atol=1e-5)
    assert (tgt[19:] == -100).all() and (seg[19:] == -1).all()


def test_layer_wise_lr_scales():
    model = Transformer(ModelConfig(preset=None, n_layer=3, n_head=2, d_model=32, vocab_size=260, tie_embeddings=False))
    groups = param_groups(model, 0.1, layer_lr_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.blocks[2].attn.wq.weight)] == 1.0
    assert scale[id(model.blocks[1].mlp.w1.weight)] == 0.5
    assert scale[id(model.blocks[0].norm1.weight)] == 0.25
    assert scale[id(model.tok_emb.weight)] == 0.125
    assert scale[id(model.lm_head.weight)] == 1.0 and scale[id(model.norm_f.weight)] == 1.0


def test_mixture_sampling_follows_weights():
    ex = [(np.arange(5), np.arange(1, 6))]
    tasks = [TaskData("a", 3.0, ex, []), TaskData("b", 1.0, ex, [])]
    sb = SFTBatches(tasks, batch_size=8, seq_len=16, pad_id=0, seed=1, packing=True)
    counts = np.zeros(2)
    for step in range(500):
        counts += np.bincount(sb.task_of_rows(np.random.default_rng([1, step, 0, 0])), minlength=2)
    share = counts[0] / counts.sum()
    assert abs(share - 0.75) < 0.02


def test_truncation_counts_and_drops_examples_without_reply():
    tok = bytes_tokenizer()
    convs = [[{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 100}]]
    out, truncated, dropped = encode_examples(tok, PromptFormat("chatml"), convs, 64, False)
    assert truncated == 1 and dropped == 1 and len(out) == 1 and len(out[0][0]) == 64


def test_full_and_freeze_finetune_through_cli(cli, tmp_path):
    base, data = _base(tmp_path), _data(tmp_path)
    code, _, err = cli(*_ft_args(base, data, tmp_path / "ft-freeze", "--set", "finetune.method=freeze",
                                 "--set", "finetune.trainable_layers=1"))
    assert code == 0, err
    before, after = load_model(str(base)).model, load_model(str(tmp_path / "ft-freeze" / "final")).model
    for (name, p0), (_, p1) in zip(before.state_dict().items(), after.state_dict().items()):
        changed = not torch.equal(p0, p1)
        assert changed == (name.startswith("blocks.2.") or name.startswith("norm_f")), name
    _, meta = read_model_config(tmp_path / "ft-freeze" / "final")
    assert meta["prompt_format"] == {"name": "chat_template"} and meta["kind"] == "finetune"
    # resume continues where the run stopped
    code, _, err = cli(*_ft_args(base, data, tmp_path / "ft-freeze", "--set", "finetune.method=freeze",
                                 "--set", "finetune.trainable_layers=1", "--set", "finetune.max_steps=6", "--resume"))
    assert code == 0 and "resuming" in err and "(step 4)" in err
    steps = [json.loads(x)["step"] for x in (tmp_path / "ft-freeze" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6


def test_lora_adapter_save_load_merge_and_export(cli, tmp_path):
    from transformers import AutoModelForCausalLM

    base, data = _base(tmp_path), _data(tmp_path)
    run = tmp_path / "ft-lora"
    code, _, err = cli(*_ft_args(base, data, run, "--set", "finetune.method=lora", "--set", "finetune.lr=0.05",
                                 "--set", "finetune.lora.target_modules=[wq,wv,w2]", "--merge"))
    assert code == 0, err
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    merged = load_model(str(final), merge=True).model.eval()
    unmerged = load_model(str(final), merge=False).model.eval()
    plain = load_model(str(base)).model.eval()
    ids = torch.tensor([list(b"Add 3 and 3.")])
    with torch.no_grad():
        m, u, p = merged(ids)[0], unmerged(ids)[0], plain(ids)[0]
    assert (m - u).abs().max() < 1e-5 and (m - p).abs().max() > 1e-4  # the adapter learned something
    with torch.no_grad():
        assert (load_model(str(run / "merged")).model.eval()(ids)[0] - m).abs().max() < 1e-5
    code, _, err = cli("export", final, "--output", tmp_path / "hf")
    assert code == 0, err
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(ids).logits - m).abs().max() < 1e-4


def test_lora_finetune_is_reproducible_from_its_seed(cli, tmp_path):
    # the adapters' initial weights come from train.seed too, not from whatever the RNG held before
    from safetensors.torch import load_file

    base, data = _base(tmp_path), _data(tmp_path)
    weights = []
    for run in ("a", "b"):
        torch.rand(17)  # a different RNG state before each run
        code, _, err = cli(*_ft_args(base, data, tmp_path / run, "--set", "finetune.method=lora",
                                     "--set", "finetune.max_steps=2", "--set", "finetune.eval_every=2"))
        assert code == 0, err
        weights.append(load_file(str(tmp_path / run / "final" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_refusals(cli, tmp_path):
    base, data = _base(tmp_path), _data(tmp_path)
    code, _, err = cli(*_ft_args(tmp_path / "missing", data, tmp_path / "r1"))
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    code, _, err = cli(*_ft_args(base, bad, tmp_path / "r2"))
    assert code == 2 and "bad.jsonl:2" in err and "completion" in err
    code, _, err = cli(*_ft_args(base, data, tmp_path / "r3", "--set", "finetune.method=lora",
                                 "--set", "finetune.lora.target_modules=[q_proj]"))
    assert code == 2 and "q_proj" in err and "wq" in err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT}) + "\n")
    no_tmpl = _base(tmp_path / "nt", chat_template=False)
    args = _ft_args(no_tmpl, chat, tmp_path / "r4")
    args[args.index(f"finetune.datasets=[{{source: {chat}, format: prompt_completion}}]")] = \
        f"finetune.datasets=[{{source: {chat}, format: chat}}]"
    code, _, err = cli(*args)
    assert code == 2 and "chat template" in err


def test_heldout_examples_are_written_and_scored(cli, tmp_path):
    """finetune.val_examples holds out exactly N examples; they go to heldout.jsonl, the finetuned model
    is scored on them at the end (finetune.eval_metrics), and `llmgen eval --data` scores the base on
    the very same examples."""
    base, data = _base(tmp_path), _data(tmp_path, n=30)
    run = tmp_path / "ft"
    code, _, err = cli(*_ft_args(base, data, run, "--set", "finetune.val_examples=6",
                                 "--set", "finetune.eval_metrics=[rouge]", "--set", "generate.max_new_tokens=8"))
    assert code == 0, err
    held = [json.loads(x)["messages"] for x in (run / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 6
    prompts = {m[0]["content"] for m in held}
    all_prompts = {f"Add {i} and {i}." for i in range(30)}
    assert prompts < all_prompts and held[0][-1]["content"].startswith("The sum is")
    report = json.loads((run / "heldout_eval.json").read_text())
    entry = report["results"][0]
    assert entry["config"]["data"]["examples"] == 6
    assert {e["prompt"] for e in entry["examples"]} == prompts
    assert 0.0 <= entry["scores"]["rougeL"] <= 1.0 and "held-out examples: rouge1" in err
    code, _, err = cli("eval", "--model", base, "--data", run / "heldout.jsonl", "--metrics", "rouge",
                       "--output", tmp_path / "base.json", "--set", "generate.max_new_tokens=8")
    assert code == 0, err
    base_entry = json.loads((tmp_path / "base.json").read_text())["results"][0]
    assert {e["prompt"] for e in base_entry["examples"]} == prompts
    # a bad metric name is refused before any training happens
    code, _, err = cli(*_ft_args(base, data, tmp_path / "ft2", "--set", "finetune.eval_metrics=[rogue]"))
    assert code == 2 and "rogue" in err and not (tmp_path / "ft2").exists()

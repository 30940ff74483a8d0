"""The decoding engine, its samplers, chat, and the generate/chat CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from llmgen.config import EngineOptions, GenerateConfig, ModelConfig
from llmgen.data.chat_format import PromptFormat, render_chat_template
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.generate import compile_plan
from llmgen.generate import sampling as S
from llmgen.generate.engine import Engine, GenerationStats
from llmgen.errors import LlmgenError
from llmgen.generate.scheduler import IncrementalDecoder
from llmgen.kernels import blockwise, cpu_matmul, fp16_weights
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer

GREEDY = GenerateConfig(max_new_tokens=24, temperature=0.0)


def tiny_model(arch="llama", seed=0, max_seq_len=96):
    torch.manual_seed(seed)
    cfg = ModelConfig(preset=None, arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None,
                      d_model=64, max_seq_len=max_seq_len, vocab_size=260)
    return Transformer(cfg)


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), bytes_tokenizer(), options=EngineOptions(device="cpu"))


@pytest.fixture
def ckpt(tmp_path):
    """A complete llmgen checkpoint of a random tiny model with a bytes tokenizer."""
    tok_dir = tmp_path / "tok"
    bytes_tokenizer().save(tok_dir)
    folder = tmp_path / "run" / "final"
    save_checkpoint(folder, tiny_model(), tok_dir, {"step": 0})
    return folder


# ---------------------------------------------------------------------------------- samplers


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(S.top_p(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8 exactly
    kept = torch.isfinite(S.top_p(logits, 0.81))[0].tolist()
    assert kept == [True, True, True, False]
    assert torch.isfinite(S.top_p(logits[:, [3, 1, 0, 2]], 0.6))[0].tolist() == [False, True, True, False]


def test_top_k_and_min_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(S.top_k(logits, 2))[0].tolist() == [False, True, True, False]
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(S.min_p(logits, 0.3))[0].tolist()
    assert kept == [bool(p >= 0.3 * probs.max()) for p in probs]


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = S.repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_frequency_and_ngram():
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0, 1, 3, 0, 0]])
    assert S.presence_frequency_penalty(logits, counts, 0.5, 0.25)[0].tolist() == [0.0, -0.75, -1.25, 0.0, 0.0]
    out = S.no_repeat_ngram(logits, [[1, 2, 3, 1, 2]], 3)  # "1 2" was followed by 3 -> 3 banned
    assert torch.isinf(out[0]).tolist() == [False, False, False, True, False]


def test_low_temperature_sampling_equals_greedy(engine):
    g = engine.generate(["The sea"], GREEDY)[0][0]
    s = engine.generate(["The sea"], GenerateConfig(max_new_tokens=24, temperature=1e-4, seed=1))[0][0]
    assert s.tokens == g.tokens


# ---------------------------------------------------------------------------------- engine


def test_greedy_matches_naive_full_recompute(engine):
    ids = engine.tok.encode("Once upon")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(24):
            logits = engine.model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert engine.generate(["Once upon"], GREEDY)[0][0].tokens == seq[len(ids):]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_ragged_prompts_equal_one_by_one(arch):
    eng = Engine(tiny_model(arch), bytes_tokenizer(), options=EngineOptions(device="cpu"))
    prompts = ["A", "Hello there, friend", "xyz 123"]
    batched = eng.generate(prompts, GREEDY)
    for prompt, got in zip(prompts, batched):
        assert got[0].tokens == eng.generate([prompt], GREEDY)[0][0].tokens


def test_beam_search_width_one_is_greedy_and_beams_score_sorted(engine):
    ids = engine.tok.encode("Once")
    p = GenerateConfig(max_new_tokens=24, temperature=0.0, num_beams=1)
    beam = engine._beam_search(ids, p, engine._stops(p, None), GenerationStats())
    assert beam[0].tokens == engine.generate(["Once"], GREEDY)[0][0].tokens
    outs = engine.generate(["Once"], GenerateConfig(max_new_tokens=12, temperature=0.0, num_beams=4,
                                                    num_return_sequences=3))[0]
    assert len(outs) == 3 and [o.score for o in outs] == sorted([o.score for o in outs], reverse=True)
    greedy_logp = _logprob(engine, ids, engine.generate(["Once"], GenerateConfig(max_new_tokens=12, temperature=0.0))[0][0].tokens)
    assert _logprob(engine, ids, outs[0].tokens) >= greedy_logp - 1e-4  # beams find at least as likely text


def _logprob(engine, prompt, new):
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = engine.model(seq)
    lp = logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1:].sum())


def test_stop_strings_span_tokens_and_are_trimmed(engine):
    full = engine.generate(["Hi"], GREEDY)[0][0].text
    stop = full[5:8]  # three bytes = three tokens
    cut = engine.generate(["Hi"], GenerateConfig(max_new_tokens=24, temperature=0.0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.find(stop)]
    streamed = "".join(engine.stream("Hi", GenerateConfig(max_new_tokens=24, temperature=0.0, stop=[stop])))
    assert streamed == cut.text


def test_seeded_sampling_is_reproducible_and_streaming_matches(engine):
    p = GenerateConfig(max_new_tokens=30, temperature=1.0, top_k=50, seed=7)
    a = engine.generate(["Seed"], p)[0][0]
    b = engine.generate(["Seed"], p)[0][0]
    assert a.tokens == b.tokens
    assert "".join(engine.stream("Seed", p)) == a.text
    c = engine.generate(["Seed"], GenerateConfig(max_new_tokens=30, temperature=1.0, top_k=50, seed=8))[0][0]
    assert c.tokens != a.tokens


def test_streaming_handles_multibyte_utf8():
    tok = bytes_tokenizer()
    dec = IncrementalDecoder(tok)
    text = "héllo — ünïcode ✓"
    pieces = [dec.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_long_prompt_refused_or_truncated(engine):
    long = "x" * 200
    with pytest.raises(LlmgenError, match="context is 96"):
        engine.generate([long], GREEDY)
    out = engine.generate([long], GenerateConfig(max_new_tokens=10, temperature=0.0, truncate_prompt=True))[0][0]
    assert out.prompt_tokens + 10 <= 96 and len(out.tokens) == 10


def test_chat_template_rendering_matches_transformers():
    from transformers import PreTrainedTokenizerFast

    tok = bytes_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok, chat_template=tok.chat_template, eos_token=tok.eos_token)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    ours = render_chat_template(tok, msgs, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert PromptFormat("chat_template").prompt(tok, msgs) == ours
    assert PromptFormat("chat_template").stops(tok) == ["<|im_end|>"]


# ---------------------------------------------------------------------------------- CLI


def test_cli_generate_json_and_stream(cli, ckpt):
    code, out, err = cli("generate", "Hello", "--model", ckpt, "-n", "12", "--temperature", "0", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["completions"][0]["new_tokens"] <= 12 and rec["prompt_tokens"] == 5
    code, out2, err = cli("generate", "Hello", "--model", ckpt.parent, "-n", "12", "--temperature", "0")
    assert code == 0, err
    assert out2.strip() == "Hello" + rec["completions"][0]["text"].rstrip() or out2.startswith("Hello")
    assert "tokens/s" in err and str(ckpt) in err
    assert rec["prefill_seconds"] + rec["decode_seconds"] == pytest.approx(rec["seconds"], abs=2e-4)
    # a system prompt asks for the chat template (the model was not instruction-finetuned by llmgen, as an
    # imported instruct model): both turns rendered in it, and only the reply printed
    code, out4, err = cli("generate", "Hello", "--model", ckpt, "-n", "6", "--temperature", "0", "--json", "--system", "Be kind.")
    assert code == 0, err
    wrapped = json.loads(out4)
    assert wrapped["prompt_tokens"] > 5 + len("Be kind.")
    code, out5, err = cli("generate", "Hello", "--model", ckpt, "-n", "6", "--temperature", "0", "--system", "Be kind.")
    assert code == 0 and not out5.startswith("Hello"), out5
    assert out5.strip() == wrapped["completions"][0]["text"].strip()
    code, _, err = cli("generate", "x" * 70, "--model", ckpt, "-n", "4", "--temperature", "0")
    assert code == 0 and "prompt 70 tokens in" in err and "decoding" in err, err  # a long prompt's pass apart
    code, out3, err = cli("generate", "Hello", "--model", ckpt, "-n", "12", "--temperature", "0", "--json",
                          "--quantize", "int8")
    assert code == 0 and "int8 weights" in err, err
    assert json.loads(out3)["completions"][0]["new_tokens"] >= 1
    if blockwise.missing() is None:
        code, out4, err = cli("generate", "Hello", "--model", ckpt, "-n", "12", "--temperature", "0", "--json",
                              "--quantize", "int4")
        assert code == 0 and "int4 weights (blocks of 32, int8 head)" in err, err
        assert json.loads(out4)["completions"][0]["new_tokens"] >= 1
    code, _, err = cli("generate", "Hello", "--model", ckpt, "--quantize", "int3")
    assert code == 2 and "int3" in err


def test_cli_generate_batch_file_resumes(cli, ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Prompt {i}", "id": i}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", ckpt, "--input-file", prompts, "--output-file", out, "-n", "6",
            "--temperature", "0", "--batch-size", "2"]
    assert cli(*args)[0] == 0
    full = out.read_text().splitlines()
    assert [json.loads(x)["id"] for x in full] == list(range(5))
    out.write_text("\n".join(full[:2]) + "\n" + full[2][:10])  # two done, one torn line
    code, _, err = cli(*args)
    assert code == 0 and "already holds 2 of 5" in err
    def strip(lines):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert strip(out.read_text().splitlines()) == strip(full)  # greedy: identical results, none lost


def test_cli_generate_errors(cli, ckpt, tmp_path):
    code, _, err = cli("generate", "Hi", "--model", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    code, _, err = cli("generate", "Hi", "--model", ckpt, "--top-p", "1.5")
    assert code == 2 and "top_p" in err
    code, _, err = cli("generate", "Hi", "--model", ckpt, "--temperature", "-1")
    assert code == 2 and "temperature" in err
    code, _, err = cli("generate", "Hi", "--model", ckpt, "--num-beams", "2", "--top-k", "5")
    assert code == 2 and "beam" in err
    (ckpt / "model.safetensors").write_bytes(b"garbage" * 10)
    code, _, err = cli("generate", "Hi", "--model", ckpt)
    assert code == 2 and "damaged" in err
    (ckpt / "model.safetensors").unlink()
    code, _, err = cli("generate", "Hi", "--model", ckpt)
    assert code == 2 and "model.safetensors" in err and len(err.strip().splitlines()) == 1


def test_cli_chat_repl(cli, ckpt, tmp_path, monkeypatch):
    import io

    saved = tmp_path / "conv.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hello\n/save {saved}\n/reset\nAgain\n/exit\n"))
    code, out, err = cli("chat", "--model", ckpt, "--system", "You are a pirate.", "-n", "8", "--seed", "1")
    assert code == 0, err
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == "You are a pirate." and "(conversation cleared)" in out


@pytest.mark.slow
def test_compiled_step_runs_split_product_as_one_operator(monkeypatch):
    """Where the split matrix-vector product pays, the compiled step calls it as the opaque
    llmgen::split_linear operator (so inductor keeps BLAS calls); its tokens equal the eager engine's."""
    import copy

    if torch.get_num_threads() < 2:
        pytest.skip("the split needs 2 threads")
    monkeypatch.setattr(cpu_matmul, "split_pays", lambda: True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=8, n_kv_head=4, d_model=512, max_seq_len=128,
                                    vocab_size=260))  # 512 x 1024 q/k/v weight: 2 MB, past the split threshold
    tok = bytes_tokenizer()
    eager = Engine(copy.deepcopy(model), tok, options=EngineOptions(device="cpu", quantize="none"))
    compiled = Engine(copy.deepcopy(model), tok, options=EngineOptions(device="cpu", quantize="none", compile=True))
    assert compiled.model.blocks[0].attn.fused_qkv.weight.stride(0) == 1  # column-major: the split path is taken
    p = GenerateConfig(max_new_tokens=12, temperature=0.0)
    want = [c[0].tokens for c in eager.generate(["Hello there"], p)]
    from torch._dynamo.utils import counters

    counters.clear()
    got = [c[0].tokens for c in compiled.generate(["Hello there"], p)]  # compiles
    assert got == want
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per step (the thread count
    # used to be asked inside it, which split the step into a graph per projection)
    bmm, calls = torch.bmm, []
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[0]) or bmm(a, b))
    result = compiled.generate(["Hello there"], p)  # the compiled step, no recompiling
    assert [c[0].tokens for c in result] == want and result.stats.compile_s == 0
    m = compiled.model
    weights = [w for b in m.blocks for w in (b.attn.fused_qkv.weight, b.attn.wo.weight, b.mlp.fused_gate_up.weight, b.mlp.w2.weight)]
    split = sum(w.numel() >= 1 << 18 for w in weights + [m.lm_head.weight])
    # the eager prefill and every compiled step (max_new_tokens - 1 of them) ran each split product
    assert len(calls) == split * p.max_new_tokens and split == 8, (len(calls), split)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "fp16", "int4"])
def test_compiled_decode_step_matches_eager(quantize):
    """generate.compile: the torch.compile'd decode steps (one row alone; several rows, each at its own
    position, with dynamic row and slot counts) give the eager engine's tokens, each in one graph (fp16
    weights through the llmgen::fp16_linear operator, int4 blocks through llmgen_blockwise's). The fp16
    case runs after the fp32 one in the same process: each engine must compile its own graphs, not reuse
    another engine's."""
    import copy

    from torch._dynamo.utils import counters

    if quantize == "fp16" and not fp16_weights.available():
        pytest.skip("no FBGEMM fp16 product in this torch build")
    if quantize == "int4" and blockwise.missing():
        pytest.skip(blockwise.missing())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128,
                                    vocab_size=260))
    tok = bytes_tokenizer()
    eager = Engine(copy.deepcopy(model), tok, options=EngineOptions(device="cpu", quantize=quantize))
    compiled = Engine(copy.deepcopy(model), tok, options=EngineOptions(device="cpu", quantize=quantize, compile=True))
    p = GenerateConfig(max_new_tokens=24, temperature=0.0)
    counters.clear()
    compiles = []
    for prompts in (["Hello there", "A much longer prompt than the first"], ["Once upon a time"],
                    ["Again", "Three rows now", "x"]):
        want = [c[0].tokens for c in eager.generate(prompts, p)]
        result = compiled.generate(prompts, p)
        assert [c[0].tokens for c in result] == want
        compiles.append(result.stats.compile_s)  # timed apart from decoding
    # the first batch compiles the several-rows step (and the one-row step once a row decodes alone);
    # later calls reuse them, also for another row count
    assert compiles[0] > 0 and compiles[2] == 0, compiles
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_plan_break_even_from_recorded_timings(tmp_path, monkeypatch):
    """generate.compile auto decides from this machine's timings: compile seconds over the per-step gain,
    apart for short and long rows; with only the eager step timed, a minute of eager decoding; nothing
    timed, or a broken record, means decode eagerly."""
    monkeypatch.setenv("LLMGEN_CACHE_DIR", str(tmp_path))
    k = "some model"
    assert compile_plan.pays_after(k, long=False)[0] is None
    compile_plan.note(k, long=False, compiled=False, steps=100, seconds=2.0, compile_s=0.0)  # eager 20 ms a step
    assert compile_plan.pays_after(k, long=False)[0] == 3000  # PRIOR_S (60 s) of eager steps
    compile_plan.note(k, long=False, compiled=True, steps=100, seconds=1.5, compile_s=40.0)  # 15 ms, a cold compile
    assert compile_plan.pays_after(k, long=False)[0] == 3000  # the first compile filled inductor's cache: not the cost
    compile_plan.note(k, long=False, compiled=True, steps=100, seconds=1.5, compile_s=6.0)  # a warm compile
    assert compile_plan.pays_after(k, long=False) == (1200, "measured here")  # 6 s / 5 ms
    assert compile_plan.pays_after(k, long=True)[0] == 3000  # long rows: their own graph, the eager step stands in
    compile_plan.note(k, long=False, compiled=True, steps=4, seconds=9.0, compile_s=3.0)  # too few steps to time
    assert compile_plan.pays_after(k, long=False)[0] == 600  # only the newer compile time counts
    compile_plan.note(k, long=True, compiled=False, steps=50, seconds=1.0, compile_s=0.0)
    for _ in range(2):
        compile_plan.note(k, long=True, compiled=True, steps=50, seconds=1.1, compile_s=5.0)
    assert compile_plan.pays_after(k, long=True)[0] == sys.maxsize  # compiled measured slower: never
    (tmp_path / "compile.json").write_text("{not json")
    assert compile_plan.pays_after(k, long=False)[0] is None


def test_engine_plans_compiling_for_the_work_ahead(tmp_path, monkeypatch):
    """compile auto: nothing timed or one short answer stays eager, long work compiles; the reason is in
    the one-line summary; explicit settings stand; every generation records its step time."""
    monkeypatch.setenv("LLMGEN_CACHE_DIR", str(tmp_path))
    auto = Engine(tiny_model(), bytes_tokenizer(), options=EngineOptions(device="cpu", quantize="none"))
    auto.plan(10**6, "a file")  # nothing timed on this machine yet: eager, and this run times the step
    assert not auto.compiling and "eager decode step (auto: a file ~1,000,000 steps; decoding eagerly" in auto.describe()
    auto.generate(["Hello"], GenerateConfig(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    record = json.loads((tmp_path / "compile.json").read_text())
    eager_ms = record[auto.plan_key]["short"]["eager_ms"]
    assert list(record) == [auto.plan_key] and eager_ms > 0
    minute = math.ceil(compile_plan.PRIOR_S * 1000 / eager_ms)
    auto.plan(minute - 1, "one prompt", long=False)  # short rows: the class that was timed
    assert not auto.compiling and f"compiling pays after {minute:,} steps, taken as 60 s" in auto.describe()
    auto.plan(minute, "a file", long=False)
    assert auto.compiling and "compiled decode step (auto: a file" in auto.describe()
    compile_plan.note(auto.plan_key, long=False, compiled=False, steps=100, seconds=2.0, compile_s=0.0)  # 20 ms
    for _ in range(2):  # a cold compile, then one from inductor's cache
        compile_plan.note(auto.plan_key, long=False, compiled=True, steps=100, seconds=1.0, compile_s=1.0)  # 10 ms
    measured = Engine(tiny_model(), bytes_tokenizer(), options=EngineOptions(device="cpu", quantize="none"))
    measured.plan(99, "one prompt")  # 1 s of compiling at 10 ms saved a step: 100 steps
    assert not measured.compiling and "pays after 100 steps, measured here" in measured.describe()
    measured.plan(100, "one prompt")
    assert measured.compiling
    never = Engine(tiny_model(), bytes_tokenizer(), options=EngineOptions(device="cpu", compile=False))
    never.plan(10**6, "a file")
    assert not never.compiling and "decode step" not in never.describe()


def test_generate_cli_reports_the_compile_plan(cli, ckpt):
    code, out, err = cli("generate", "Hello", "--model", str(ckpt), "-n", "5", "--json")
    assert code == 0, err
    assert "eager decode step (auto: one prompt ~5 steps" in json.loads(out)["engine"]


@pytest.mark.slow
def test_compiled_long_row_keeps_one_graph_to_the_end_of_its_cache():
    """A long row (more than SHORT_ROW slots) decodes with one graph whose slot count is dynamic (the whole
    cache goes in, written in place), up to the last bucket, and gives the eager engine's tokens."""
    import copy

    model = tiny_model(max_seq_len=1024)
    eng = Engine(copy.deepcopy(model), bytes_tokenizer(),
                 options=EngineOptions(device="cpu", quantize="none", compile=True))
    p = GenerateConfig(max_new_tokens=900, temperature=0.0, ignore_eos=True)
    result = eng.generate(["Hi"], p)
    assert len(result[0][0].tokens) == 900 and result.stats.compile_s > 0
    eager = Engine(model, bytes_tokenizer(), options=EngineOptions(device="cpu", quantize="none", compile=False))
    assert result[0][0].tokens == eager.generate(["Hi"], p)[0][0].tokens
    step = eng._compiled._torchdynamo_orig_callable
    assert len(_debug_get_cache_entry_list(step.__code__)) == 1  # slots 256, 512, 768, 1024: one graph

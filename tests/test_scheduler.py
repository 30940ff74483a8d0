"""Continuous batching: a request's output does not depend on what runs beside it; rows are reused,
long prompts are prefilled in chunks between decode steps, cancelled requests leave at once."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from llmgen.config import EngineOptions, GenerateConfig, ModelConfig
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.generate.engine import Engine
from llmgen.generate.scheduler import Request, Scheduler
from llmgen.model.transformer import Transformer

PROMPTS = ["Once", "The quick brown fox jumps over the lazy dog", "a", "Hello, world!", "Numbers 1 2 3 4 5 6",
           "x" * 70, "Tell me a story about a cat.", "ok", "Zebras", "!!", "long " * 20, "q", "The sea", "B",
           "Rain falls", "end"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def engine(request):
    torch.manual_seed(0)
    cfg = ModelConfig(preset=None, arch=request.param, n_layer=2, n_head=4, n_kv_head=2 if request.param == "llama" else None,
                      d_model=64, max_seq_len=160, vocab_size=260)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked predictions: greedy choices are not near-ties
    return Engine(model, bytes_tokenizer(), options=EngineOptions(device="cpu"))


def alone(engine, prompt, p):
    return engine.generate([prompt], p, max_batch=1)[0][0]


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_16(engine):
    p = GenerateConfig(max_new_tokens=20, temperature=0.0)
    together = engine.generate(PROMPTS, p, max_batch=16)
    for prompt, [c] in zip(PROMPTS, together):
        assert c.tokens == alone(engine, prompt, p).tokens, prompt


def test_rows_are_reused_when_requests_outnumber_them(engine):
    p = GenerateConfig(max_new_tokens=12, temperature=0.0)
    few_rows = engine.generate(PROMPTS, p, max_batch=3)
    many_rows = engine.generate(PROMPTS, p, max_batch=16)
    assert [c[0].tokens for c in few_rows] == [c[0].tokens for c in many_rows]


def test_each_request_keeps_its_own_sampling_and_seed(engine):
    mixed = [GenerateConfig(max_new_tokens=16, temperature=0.9, top_k=20, seed=5),
             GenerateConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1.3),
             GenerateConfig(max_new_tokens=14, temperature=1.2, top_p=0.8, min_p=0.05, seed=9),
             GenerateConfig(max_new_tokens=8, temperature=0.0, stop=["e"])]
    sched = engine.scheduler(max_batch=4, max_len=160)
    reqs = [Request(engine.prompt_ids(prompt, p), p, *engine._stops(p, None), seed=p.seed)
            for prompt, p in zip(PROMPTS, mixed)]
    sched.run(reqs)
    for prompt, p, q in zip(PROMPTS, mixed, reqs):
        assert q.completion.tokens == alone(engine, prompt, p).tokens
        assert len(q.completion.tokens) <= p.max_new_tokens
    assert "e" not in reqs[3].completion.text and sched.running == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine):
    p = GenerateConfig(max_new_tokens=16, temperature=0.0)
    sched = engine.scheduler(max_batch=2, max_len=160)
    sched.prefill_chunk = 8
    short = Request(engine.prompt_ids("Hi", p), p, *engine._stops(p, None))
    long = Request(engine.prompt_ids("long " * 20, p), p, *engine._stops(p, None))
    sched.submit(short)
    sched.step()  # short is decoding
    sched.submit(long)
    steps = 0
    while not long.done:
        before = len(short.generated)
        sched.step()
        steps += 1
        if long.prefilled < len(long.ids) and not short.done:
            assert len(short.generated) == before + 1  # the short one kept decoding meanwhile
    assert steps >= 100 // 8
    assert long.completion.tokens == alone(engine, "long " * 20, p).tokens
    assert short.completion.tokens == alone(engine, "Hi", p).tokens


def test_first_tokens_are_handed_over_before_the_decode_step(engine):
    """A step that prefills a prompt calls its hand-over with the row's first token, then decodes; a server's
    first token reaches its client a decode step sooner. A step without a new first token does not call it."""
    p = GenerateConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    sched = engine.scheduler(max_batch=2, max_len=160)
    a, b = (Request(engine.prompt_ids(x, p), p, *engine._stops(p, None)) for x in ("Once", "The sea"))
    seen = []
    sched.submit(a)
    sched.step(lambda: seen.append(len(a.generated)))
    assert seen == [1] and len(a.generated) == 2
    sched.step(lambda: seen.append("decode only"))
    assert seen == [1] and len(a.generated) == 3
    sched.submit(b)
    sched.step(lambda: seen.append((len(a.generated), len(b.generated))))
    assert seen == [1, (3, 1)] and (len(a.generated), len(b.generated)) == (4, 2)


def test_kept_prompt_prefixes_give_the_same_tokens_with_less_prefill(engine):
    """With a prefix cache a prompt that starts as an earlier one did copies its KV entries instead of
    computing them (all of the prompt but its last token at most), and generates exactly what it generates
    without; least recently used prefixes go past the token budget; a short shared start is not reused."""
    p = GenerateConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    system = "You are a helpful assistant who answers in one short sentence. "
    prompts = [system + "What is the sea?", system + "What is a cat?", system + "What is the sea?", "Hi there"]

    def run(cache):
        sched = Scheduler(engine, max_batch=2, max_len=160, prefix_cache=cache)
        reqs = [Request(engine.prompt_ids(x, p), p, *engine._stops(p, None)) for x in prompts]
        for r in reqs:  # one after another: each can find the ones before it
            sched.run([r])
        return sched, reqs

    plain, want = run(0)
    cached, got = run(1000)
    assert [r.completion.tokens for r in got] == [r.completion.tokens for r in want]
    shared = len(os.path.commonprefix([got[0].ids, got[1].ids]))
    assert shared >= 8 and [r.reused for r in want] == [0, 0, 0, 0]
    assert [r.reused for r in got] == [0, shared, len(got[2].ids) - 1, 0]
    assert cached.stats.prefix_tokens == shared + len(got[2].ids) - 1 and plain.stats.prefix_tokens == 0
    small, _ = run(len(got[0].ids) + 2)  # room for one prompt: each new one pushes the one before out, so
    # the third finds the second's start (the system message), no longer the first's whole prompt
    assert len(small.prefixes) == 1 and small.stats.prefix_tokens == 2 * shared


def test_cancel_frees_the_row_at_the_next_step(engine):
    p = GenerateConfig(max_new_tokens=100, temperature=0.0)
    sched = engine.scheduler(max_batch=1, max_len=160)
    a = Request(engine.prompt_ids("Once", p), p, *engine._stops(p, None))
    b = Request(engine.prompt_ids("The sea", p), p, *engine._stops(p, None))
    sched.submit(a)
    sched.submit(b)
    for _ in range(3):
        sched.step()
    assert sched.running == 1 and sched.queued == 1
    made = len(a.generated)
    sched.cancel(a)
    sched.step()
    assert a.completion.finish_reason == "cancelled" and len(a.generated) == made
    assert sched.running == 1 and sched.queued == 0  # b took the row


def test_background_thread_serves_submitted_requests(engine):
    sched = engine.scheduler(max_batch=4, max_len=160)
    stop = threading.Event()
    thread = threading.Thread(target=sched.serve, args=(stop,), daemon=True)
    thread.start()
    p = GenerateConfig(max_new_tokens=10, temperature=0.0)
    done = threading.Semaphore(0)
    pieces: dict[int, list[str]] = {}
    reqs = []
    for prompt in PROMPTS[:6]:
        q = Request(engine.prompt_ids(prompt, p), p, *engine._stops(p, None), on_done=lambda _: done.release())
        pieces[q.id] = []
        q.on_piece = pieces[q.id].append
        reqs.append(q)
        sched.submit(q)
    for _ in reqs:
        assert done.acquire(timeout=60)
    stop.set()
    thread.join(timeout=10)
    for prompt, q in zip(PROMPTS, reqs):
        assert "".join(pieces[q.id]) == q.completion.text == alone(engine, prompt, p).text

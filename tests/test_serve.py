"""`llmgen serve` through the official `openai` client: models, completions and chat (plain and
streamed), usage, errors, auth, cancellation, concurrency, metrics, and SIGTERM draining."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
try:  # the HTTP client the openai package uses (httpx, or httpx2 in its newest releases)
    import httpx
except ImportError:
    import httpx2 as httpx  # noqa: E402
import uvicorn  # noqa: E402

from llmgen.config import EngineOptions, GenerateConfig, ModelConfig, ServeConfig, load_persona  # noqa: E402
from llmgen.data.tokenizer import train_bpe  # noqa: E402
from llmgen.generate.engine import Engine, GenerationStats  # noqa: E402
from llmgen.generate.scheduler import Request  # noqa: E402
from llmgen.model.checkpoint import save_checkpoint  # noqa: E402
from llmgen.model.transformer import Transformer  # noqa: E402
from llmgen.serve.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. A small cat sat on the warm mat and purred. " * 30


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    tok = train_bpe([TEXT], 400)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=1024,
                      vocab_size=tok.vocab_size)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked predictions: no near-ties in greedy choices
    tok.save(tmp / "tok")
    folder = tmp / "tiny" / "final"
    save_checkpoint(folder, model, tmp / "tok", {"step": 0})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, folder: Path, **serve):
        self.engine = Engine.load(str(folder))
        personas = [load_persona(REPO / "configs" / "personas" / f"{n}.yaml") for n in ("support", "writer")]
        self.cfg = ServeConfig(port=free_port(), **serve)
        app = create_app(self.engine, "tiny", self.cfg, GenerateConfig(max_new_tokens=32), personas)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.cfg.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.cfg.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=serve.get("api_key") or "none", max_retries=0)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def srv(ckpt):
    s = Running(ckpt, max_batch=16, max_queue=64)
    yield s
    s.stop()


def greedy_cli(cli, folder, prompt: str, n: int) -> str:
    code, out, err = cli("generate", "--model", str(folder), "--temperature", "0", "--raw", "--max-new-tokens", str(n),
                         "--json", prompt)
    assert code == 0, err
    return json.loads(out)["completions"][0]["text"]


def test_models_lists_the_model_and_its_personas(srv):
    ids = [m.id for m in srv.client.models.list().data]
    assert ids == ["tiny", "tiny/support", "tiny/writer"]


def test_completion_equals_llmgen_generate_and_reports_usage(srv, ckpt, cli):
    r = srv.client.completions.create(model="tiny", prompt="The quick brown", max_tokens=20, temperature=0)
    assert r.choices[0].text == greedy_cli(cli, ckpt, "The quick brown", 20)
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "text_completion"
    prompt_tokens = len(srv.engine.tok.encode("The quick brown"))
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens and r.id and r.created and r.model == "tiny"


def test_chat_plain_and_streamed_agree(srv):
    msgs = [{"role": "user", "content": "Tell me about the cat."}]
    plain = srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    chunks = list(srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.prompt_tokens == len(srv.engine.prompt_ids(msgs, GenerateConfig()))


def test_ignore_eos_also_ignores_the_chat_formats_end_of_turn(srv):
    """Fixed-length outputs for benchmarks (vLLM's and llama.cpp's `ignore_eos`): a chat turn's end
    token or string no longer stops the answer; stops the request names still do."""
    fmt = srv.engine.format_for([[{"role": "user", "content": "hi"}]], GenerateConfig())
    ids, text = srv.engine._stops(GenerateConfig(), fmt)
    assert ids - {srv.engine.tok.eot_id} or text  # the format has an end of turn of its own
    assert srv.engine._stops(GenerateConfig(ignore_eos=True, stop=["cat"]), fmt) == (set(), ["cat"])


def test_persona_applies_its_system_prompt_and_defaults(srv):
    msgs = [{"role": "user", "content": "Where is my order?"}]
    with_persona = srv.client.chat.completions.create(model="tiny/support", messages=msgs, temperature=0, max_tokens=12)
    support = load_persona(REPO / "configs" / "personas" / "support.yaml")
    explicit = srv.client.chat.completions.create(model="tiny", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": support.system}] + msgs, extra_body={"repetition_penalty": 1.1, "top_p": 0.9})
    assert with_persona.choices[0].message.content == explicit.choices[0].message.content


def test_n_choices_and_seed(srv):
    r = srv.client.completions.create(model="tiny", prompt="A small", max_tokens=10, temperature=1.0, n=3, seed=7)
    again = srv.client.completions.create(model="tiny", prompt="A small", max_tokens=10, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]


@pytest.mark.parametrize("kwargs,status,param", [
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(max_tokens=1020), 400, "max_tokens"),  # prompt + max_tokens past the 1024-token context
    (dict(model="nope"), 404, "model"),
    (dict(extra_body={"logprobs": 2}), 400, "logprobs"),
    (dict(extra_body={"stop": 5}), 400, "stop"),
    (dict(extra_body={"max_tokens": "ten"}), 400, "max_tokens"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(srv, kwargs, status, param):
    args = dict(model="tiny", prompt="The quick brown fox jumps over the lazy dog", max_tokens=5) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        srv.client.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body else e.value.body["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert srv.health()["status"] == "ok"
    assert srv.client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_malformed_bodies(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (srv.cfg.max_body_kb * 1024 + 1))
    assert r.status_code == 413
    assert srv.health() == {"status": "ok", "running": 0, "waiting": 0}


def test_sixteen_concurrent_streams_equal_one_at_a_time(srv):
    prompts = [f"The {w} cat sat on the" for w in ("small", "warm", "lazy", "quick", "brown", "old", "big", "red",
                                                     "odd", "shy", "wet", "fat", "tiny", "grey", "new", "sad")]

    def stream(prompt):
        out = srv.client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in out)

    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    alone = [srv.engine.generate([p], GenerateConfig(max_new_tokens=24, temperature=0.0, raw=True))[0][0].text
             for p in prompts]
    assert together == alone


def test_a_client_that_disconnects_frees_its_row(srv):
    # ignore_eos: a sampled end of text after a token or two would end the request before the check
    with httpx.stream("POST", srv.url + "/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 1000,
                                                                  "stream": True, "temperature": 0.7,
                                                                  "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
        assert srv.health()["running"] == 1
    deadline = time.time() + 10
    while srv.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert srv.health()["running"] == 0


def test_a_shared_start_of_prompt_is_reported_as_cached_tokens(srv):
    """The second request starting with the same long prompt copies its KV entries from the prefix cache:
    OpenAI's usage.prompt_tokens_details.cached_tokens says how many, and the answer is unchanged."""
    system = {"role": "system", "content": "You are a terse assistant for a shop that sells tea and cups. " * 2}
    msgs = [[system, {"role": "user", "content": q}] for q in ("Where is my order?", "Where is my order?",
                                                               "Do you sell cups?")]
    outs = [srv.client.chat.completions.create(model="tiny", messages=m, max_tokens=6, temperature=0) for m in msgs]
    cached = [o.usage.prompt_tokens_details.cached_tokens for o in outs]
    assert cached[1] == outs[1].usage.prompt_tokens - 1 and outs[1].choices[0].message.content == outs[0].choices[0].message.content
    assert 20 < cached[2] < outs[2].usage.prompt_tokens - 1
    assert "llmgen_prompt_tokens_cached_total" in httpx.get(srv.url + "/metrics").text


def test_metrics_count_requests_tokens_and_latencies(srv):
    srv.client.completions.create(model="tiny", prompt="The", max_tokens=5, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    assert 'llmgen_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "llmgen_time_to_first_token_seconds_bucket" in text and "llmgen_inter_token_latency_seconds_count" in text
    tokens = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmgen_generation_tokens_total")]
    assert tokens and tokens[0] >= 5


def test_web_page_is_served(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and "llmgen chat" in r.text and "/v1/chat/completions" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing loaded from the internet


def test_api_key_and_a_full_queue(ckpt):
    s = Running(ckpt, api_key="s3cret", max_batch=1, max_queue=0)
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert [m.id for m in s.client.models.list().data][0] == "tiny"
        head = {"Authorization": "Bearer s3cret"}
        body = {"model": "tiny", "prompt": "The", "max_tokens": 1000, "stream": True, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=head) as first:
            lines = first.iter_lines()  # (kept: dropping the iterator would close the stream)
            next(lines)  # it holds the only row now, and no one may wait (max_queue 0)
            r = httpx.post(s.url + "/v1/completions", headers=head, json={**body, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_cli_serve_answers_then_drains_on_sigterm(ckpt, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmgen", "serve", "--model", str(ckpt), "--port", str(port),
                             "--persona", str(REPO / "configs" / "personas" / "character.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "LLMGEN_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["tiny", "tiny/character"]
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "The", "max_tokens": 60, "stream": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not pieces:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: the response still completes
                if line:
                    pieces.append(line)
        assert pieces[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_cli_serve_on_a_port_in_use_says_so(ckpt, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llmgen", "serve", "--model", str(ckpt), "--port", str(port)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "LLMGEN_API_KEY": ""})
    assert r.returncode == 2, r.stderr
    assert f"could not serve on 127.0.0.1:{port}" in r.stderr.splitlines()[-1]


def test_a_failing_step_fails_its_requests_with_500_and_the_server_recovers(srv, monkeypatch):
    forward = srv.engine._forward
    calls = {"n": 0}

    def broken(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return forward(*a, **k)

    monkeypatch.setattr(srv.engine, "_forward", broken)
    with pytest.raises(openai.InternalServerError) as e:
        srv.client.completions.create(model="tiny", prompt="The", max_tokens=10, temperature=0)
    assert "simulated kernel failure" in str(e.value)
    monkeypatch.setattr(srv.engine, "_forward", forward)
    assert srv.health() == {"status": "ok", "running": 0, "waiting": 0}
    assert srv.client.completions.create(model="tiny", prompt="The", max_tokens=3, temperature=0).usage.completion_tokens


@pytest.mark.slow
def test_compiled_server_compiles_before_its_first_request(ckpt):
    """With generate.compile the server compiles its decode steps (one request; several) at start-up
    (warm_up), for its own cache size: the first user's request then runs the compiled step without compiling, also once its
    tokens need more than the first 256 slots (the slot count is dynamic), and its greedy tokens equal
    the eager engine's."""
    eager = Engine.load(str(ckpt))
    compiled = Engine.load(str(ckpt), options=EngineOptions(compile=True))
    app = create_app(compiled, "tiny", ServeConfig(max_len=1024), GenerateConfig(max_new_tokens=16))
    server = app.state.server
    assert server.warm_up() > 0 and compiled._compiled_shapes == {(1, 1024), ("rows", 1024)}
    calls = []
    step = compiled._compiled
    compiled._compiled = lambda *a: calls.append(1) or step(*a)
    p = GenerateConfig(max_new_tokens=300, temperature=0.0, ignore_eos=True)  # past 256 slots: a bigger view
    req = Request(compiled.tok.encode("The quick"), p, set(), [])
    stats = GenerationStats()
    server.scheduler.stats = stats
    server.scheduler.run([req])
    assert len(calls) == 299 and stats.compile_s == 0  # every step after the first token, none compiling
    want = eager.generate(["The quick"], p)[0][0].tokens
    assert req.generated == want


@pytest.mark.slow
def test_compiled_server_batches_any_row_count_in_one_graph(ckpt):
    """Several rows at once in the compiled server take the whole cache, written in place, and see its first
    rows and slots: from max_batch rows down to 2 (the cache keeps a row and a slot spare, so neither count
    ever equals its dimension and is specialized) and past 256 slots, no step compiles a graph after
    warm-up, and every row's greedy tokens equal the eager engine's."""
    from torch._dynamo.utils import counters

    eager = Engine.load(str(ckpt))
    compiled = Engine.load(str(ckpt), options=EngineOptions(compile=True))
    app = create_app(compiled, "tiny", ServeConfig(max_len=1024, max_batch=4), GenerateConfig(max_new_tokens=16))
    server = app.state.server
    server.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    p = GenerateConfig(max_new_tokens=280, temperature=0.0, ignore_eos=True)  # past 256 slots
    prompts = ["The quick", "A cat sat", "Once upon a time there", "Hello"]
    reqs = [Request(compiled.tok.encode(x), p, set(), []) for x in prompts]
    server.scheduler.run(reqs)  # 4 rows (= max_batch) decode together, then fewer as they end
    assert counters["stats"]["unique_graphs"] == graphs
    for x, r in zip(prompts, reqs):
        assert r.generated == eager.generate([x], p)[0][0].tokens

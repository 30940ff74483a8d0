"""`llmgen serve`: an OpenAI-compatible HTTP server over the engine's continuous-batching scheduler.

    GET  /v1/models             the model and one id per persona (<model>/<persona>)
    POST /v1/completions        text in, text out (plain, or streamed as server-sent events)
    POST /v1/chat/completions   messages in, the model's chat template (or finetuned format)
    GET  /health                {"status": "ok", "running": N, "waiting": M}
    GET  /metrics               Prometheus text: requests, tokens, queue, TTFT and inter-token latency
    GET  /                      the web chat page (static, in the package)

The scheduler decodes in a background thread; each HTTP request becomes one scheduler request per
choice (`n`), whose callbacks hand text back to the event loop. A client that goes away cancels its
requests (their rows are freed at the next token). Every malformed request gets a 4xx with an
OpenAI-style error body, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmgen.config import GenerateConfig, Persona, SamplingParams, ServeConfig
from llmgen.errors import LlmgenError
from llmgen.generate.engine import Engine
from llmgen.generate.scheduler import Request

STATIC = Path(__file__).with_name("static")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------- request bodies

def _number(body: dict, key: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", key,
                       "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{key} = {v} is out of range: it must be in {'(' if lo_open else '['}{lo}, {hi}]", key,
                       "invalid_value")
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop", "invalid_type")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role",
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                               "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


UNSUPPORTED = {"logprobs": "log-probabilities", "top_logprobs": "log-probabilities", "echo": "echo",
               "suffix": "suffix", "tools": "tool calls", "functions": "function calls", "best_of": "best_of",
               "response_format": "structured output"}


def sampling_for(body: dict, base: SamplingParams) -> tuple[SamplingParams, int]:
    """The request's sampling on top of the server's (or persona's) defaults, and `n`."""
    for key, what in UNSUPPORTED.items():
        v = body.get(key)
        if v not in (None, False, 0, [], {}) and not (key == "response_format" and v == {"type": "text"}):
            raise ApiError(400, f"{key}: {what} is not supported by this server", key, "unsupported_parameter")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    n = _number(body, "n", 1, 16, integer=True) or 1
    changes: dict[str, Any] = {}
    for key, field_name, lo, hi, lo_open, integer in (
            ("temperature", "temperature", 0, 2, False, False), ("top_p", "top_p", 0, 1, True, False),
            ("top_k", "top_k", 1, 10 ** 6, False, True), ("min_p", "min_p", 0, 1, False, False),
            ("presence_penalty", "presence_penalty", -2, 2, False, False),
            ("frequency_penalty", "frequency_penalty", -2, 2, False, False),
            ("repetition_penalty", "repetition_penalty", 0, 10, True, False),
            ("seed", "seed", -2 ** 63, 2 ** 63 - 1, False, True),
            ("max_tokens", "max_new_tokens", 1, 10 ** 7, False, True),
            ("max_completion_tokens", "max_new_tokens", 1, 10 ** 7, False, True)):
        v = _number(body, key, lo, hi, lo_open, integer)
        if v is not None:
            changes[field_name] = v
    stops = _stops(body)
    if stops:
        changes["stop"] = stops
    if "ignore_eos" in body:  # vLLM's and llama.cpp's extension: fixed-length outputs for benchmarks
        if not isinstance(body["ignore_eos"], bool):
            raise ApiError(400, "ignore_eos must be true or false", "ignore_eos", "invalid_type")
        changes["ignore_eos"] = body["ignore_eos"]
    p = replace(base, **changes, num_beams=1, num_return_sequences=1, truncate_prompt=False)
    if n > 1 and p.temperature == 0:
        raise ApiError(400, "n > 1 with temperature 0 returns the same text n times; set temperature > 0", "n",
                       "invalid_value")
    return p, n


# ---------------------------------------------------------------------------------------------- the app

@dataclass
class Metrics:
    registry: CollectorRegistry

    def __post_init__(self):
        r = self.registry
        self.requests = Counter("llmgen_requests", "HTTP requests to /v1 by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("llmgen_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("llmgen_prompt_tokens_cached", "Prompt tokens copied from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("llmgen_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("llmgen_requests_running", "Requests holding a KV-cache row", registry=r)
        self.waiting = Gauge("llmgen_requests_waiting", "Requests queued for a row", registry=r)
        self.ttft = Histogram("llmgen_time_to_first_token_seconds", "From arrival to the first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("llmgen_inter_token_latency_seconds", "Between two tokens of one request", registry=r,
                             buckets=(.002, .005, .01, .02, .04, .08, .16, .32, .64, 1.5))
        self.e2e = Histogram("llmgen_request_duration_seconds", "From arrival to the last token", registry=r,
                             buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))

    def observe(self, req: Request) -> None:
        self.prompt_tokens.inc(len(req.ids))
        self.cached_tokens.inc(req.reused)
        self.generation_tokens.inc(len(req.generated))
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_submit)
            for a, b in zip(req.token_times, req.token_times[1:]):
                self.itl.observe(b - a)
            self.e2e.observe(req.token_times[-1] - req.t_submit)


class Server:
    """The state behind the app: engine, scheduler thread, model ids, defaults, metrics."""

    def __init__(self, engine: Engine, model_id: str, cfg: ServeConfig, defaults: GenerateConfig,
                 personas: list[Persona]):
        self.engine, self.model_id, self.cfg = engine, model_id, cfg
        self.defaults = SamplingParams(**{k: getattr(defaults, k) for k in SamplingParams.__dataclass_fields__})
        self.personas = {f"{model_id}/{p.name}": p for p in personas}
        max_len = cfg.max_len or min(engine.cfg.max_seq_len, 4096)
        self.scheduler = engine.scheduler(cfg.max_batch, max_len, cfg.prefix_cache_mb)
        self.metrics = Metrics(CollectorRegistry())
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.driven = False  # the decode loop runs in the caller's thread (drive), not one of its own
        self.created = int(time.time())
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.outbox: list[tuple[asyncio.Queue, tuple]] = []  # filled by the scheduler thread during a step

    def warm_up(self) -> float:
        """Compile the engine's decode steps (one request alone, several at once) for this server's cache
        size now, not on the first users' requests; seconds it took."""
        t0 = time.perf_counter()
        p = replace(self.defaults, max_new_tokens=3, temperature=0.0, ignore_eos=True)
        eot = self.engine.tok.eot_id
        # two requests of different lengths: a step of two rows, then the longer one alone
        self.scheduler.run([Request([eot], replace(p, max_new_tokens=2), set(), []), Request([eot], p, set(), [])])
        return time.perf_counter() - t0

    def start(self) -> None:
        """In the event loop: the decode loop hands its results to this loop. It runs in a thread of its own
        unless `drive()` runs it in the thread that loaded the model (`llmgen serve`)."""
        self.loop = asyncio.get_running_loop()
        if not self.driven:
            self.thread = threading.Thread(target=self.scheduler.serve, args=(self.stop, self.flush),
                                           name="llmgen-scheduler", daemon=True)
            self.thread.start()

    def drive(self, start_http: Callable[[], None]) -> None:
        """Start the HTTP server (`start_http`: in another thread) and run the decode loop in the calling
        thread until the app shuts down (then `stop` is set). Call it from the thread that loaded and
        compiled the model: torch's OpenMP keeps a pool of workers per thread that runs parallel regions,
        and with a second pool on 2 cores it stops spinning and puts its workers to sleep between regions
        (~270 context switches a SmolLM2 token: 8.3 ms instead of 6.4, measured in one process)."""
        self.driven = True
        start_http()
        self.scheduler.serve(self.stop, self.flush)

    def flush(self) -> None:
        """Hand what the last step produced (pieces, finished requests) to the event loop in one wake-up,
        not one per token per stream (scheduler thread)."""
        if self.outbox:
            items, self.outbox = self.outbox, []
            try:
                self.loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed (shutting down): nobody is listening
                pass

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # ------------------------------------------------------------------ one HTTP request

    def resolve(self, body: dict) -> tuple[SamplingParams, Optional[Persona]]:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string", "model", "invalid_type")
        if model in (None, "", self.model_id):
            return self.defaults, None
        if model in self.personas:
            persona = self.personas[model]
            return replace(self.defaults, **persona.sampling), persona
        raise ApiError(404, f"The model {model!r} does not exist; GET /v1/models lists "
                            f"{', '.join([self.model_id, *self.personas])}", "model", "model_not_found")

    def make_requests(self, ids: list[int], p: SamplingParams, n: int, stops: tuple, queue) -> list[Request]:
        limit = self.scheduler.max_len
        if len(ids) + p.max_new_tokens > limit:
            room = limit - len(ids)
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                                f"and max_tokens asks for {p.max_new_tokens} more"
                                + (f" (at most {room} fit)" if room > 0 else " (shorten the prompt)"),
                           "max_tokens" if room > 0 else "messages", "context_length_exceeded")
        free = max(0, self.scheduler.max_batch - self.scheduler.running)
        if self.scheduler.queued + n > self.cfg.max_queue + free:
            raise ApiError(429, f"the server is busy ({self.scheduler.queued} requests waiting); retry shortly", None,
                           "queue_full", "rate_limit_error", headers={"Retry-After": "1"})
        reqs = []
        for k in range(n):
            req = Request(ids, p, *stops, seed=None if p.seed is None else p.seed + k)
            req.on_piece = lambda text, r=req: self.outbox.append((queue, ("piece", r, text)))
            req.on_done = lambda r: (self.metrics.observe(r), self.outbox.append((queue, ("done", r, None))))
            reqs.append(req)
        for r in reqs:
            self.scheduler.submit(r)
        return reqs

    def cancel(self, reqs: list[Request]) -> None:
        for r in reqs:
            if not r.done:
                self.scheduler.cancel(r)


class Guard:
    """The API key and body size checks on /v1 routes, and the request counter, as plain ASGI middleware
    (FastAPI's `@app.middleware("http")` passes every chunk of a streamed response through a channel
    and a task switch of its own)."""

    def __init__(self, app, server: Server, cfg: ServeConfig):
        self.app, self.server, self.cfg = app, server, cfg

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}  # names in lower case
        cfg, refusal = self.cfg, None
        if cfg.api_key and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                   f"Bearer {cfg.api_key}".encode()):
            refusal = ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                               None, "invalid_api_key")
        size = headers.get("content-length")
        if refusal is None and size is not None and size.isdigit() and int(size) > cfg.max_body_kb * 1024:
            refusal = ApiError(413, f"the request body is {int(size)} bytes; the limit is {cfg.max_body_kb} KB",
                               None, "request_too_large")
        if refusal is not None:
            self.server.metrics.requests.labels(path, str(refusal.status)).inc()
            return await refusal.response()(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.server.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def create_app(engine: Engine, model_id: str, cfg: Optional[ServeConfig] = None,
               defaults: Optional[GenerateConfig] = None, personas: Optional[list[Persona]] = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_id` (the scheduler thread starts with the app)."""
    cfg = cfg or ServeConfig()
    server = Server(engine, model_id, cfg, defaults or GenerateConfig(), personas or [])

    async def lifespan(app):
        server.start()  # in the event loop: the scheduler thread hands its results to this loop
        yield
        server.shutdown()

    app = FastAPI(title="llmgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    app.add_middleware(Guard, server=server, cfg=cfg)

    async def read_json(request: HttpRequest) -> dict:
        raw = b""
        async for chunk in request.stream():  # a body sent without Content-Length is limited too
            raw += chunk
            if len(raw) > cfg.max_body_kb * 1024:
                raise ApiError(413, f"the request body is over the {cfg.max_body_kb} KB limit", None, "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    @app.get("/v1/models")
    async def models():
        ids = [model_id, *server.personas]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": server.created, "owned_by": "llmgen"}
                                           for i in ids]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": server.scheduler.running, "waiting": server.scheduler.queued}

    @app.get("/metrics")
    async def metrics():
        server.metrics.running.set(server.scheduler.running)
        server.metrics.waiting.set(server.scheduler.queued)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/personas")
    async def persona_list():  # for the web page: names and descriptions
        return {"data": [{"id": i, "name": p.name, "description": p.description, "system": p.system,
                          "sampling": p.sampling} for i, p in server.personas.items()]}

    async def run(request: HttpRequest, chat: bool):
        body = await read_json(request)
        base, persona = server.resolve(body)
        p, n = sampling_for(body, base)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream", "invalid_type")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        eng = server.engine
        try:
            if chat:
                msgs = _messages(body)
                if persona is not None and not any(m["role"] == "system" for m in msgs):
                    msgs = [{"role": "system", "content": persona.system}] + msgs
                ids = eng.prompt_ids(msgs, p)
                stops = eng._stops(p, eng.format_for([msgs], p))
                prompts = [ids]
            else:
                prompt = body.get("prompt")
                texts = [prompt] if isinstance(prompt, str) else prompt
                if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                    raise ApiError(400, "prompt must be a string or a list of strings", "prompt", "invalid_type")
                raw = replace(p, raw=True)
                prompts = [eng.prompt_ids(t, raw) for t in texts]
                stops = eng._stops(p, None)
        except LlmgenError as e:
            raise ApiError(400, str(e), "messages" if chat else "prompt", "invalid_value") from None
        queue: asyncio.Queue = asyncio.Queue()
        reqs: list[Request] = []
        try:
            for ids in prompts:
                reqs += server.make_requests(ids, p, n, stops, queue)
        except ApiError:
            server.cancel(reqs)
            raise
        index = {r.id: i for i, r in enumerate(reqs)}  # choice index across prompts and n
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        common = {"id": rid, "created": int(time.time()), "model": body.get("model") or model_id}
        if stream:
            return StreamingResponse(_events(server, request, reqs, index, queue, chat, common, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            left = len(reqs)
            while left:
                kind, _, _ = await queue.get()
                left -= kind == "done"
        finally:
            server.cancel(reqs)  # the client went away before the end
        failed = [r for r in reqs if r.completion.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0].completion.text}", None, "internal_error", "server_error")
        choices = []
        for r in reqs:
            c = r.completion
            reason = _finish_reason(c.finish_reason)
            choices.append({"index": index[r.id], "message": {"role": "assistant", "content": c.text},
                            "finish_reason": reason, "logprobs": None} if chat else
                           {"index": index[r.id], "text": c.text, "finish_reason": reason, "logprobs": None})
        return {**common, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(reqs)}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await run(request, chat=True)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    return app


def _usage(reqs: list[Request]) -> dict:
    """OpenAI's usage object: each prompt counted once (the n choices of one share it), with the part of it
    copied from the prefix cache as cached_tokens."""
    prompts = {id(r.ids): r for r in reqs}.values()
    p_tok, c_tok = sum(len(r.ids) for r in prompts), sum(len(r.completion.tokens) for r in reqs)
    return {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok,
            "prompt_tokens_details": {"cached_tokens": sum(r.reused for r in prompts)}}


async def _next(queue: asyncio.Queue, seconds: float):
    """The queue's next item, or asyncio.TimeoutError after `seconds`. asyncio.timeout (Python 3.11+) waits
    in this task; wait_for makes a task per wait (~16 of the event loop's ~60 us a streamed token)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout=seconds)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(server: Server, http: HttpRequest, reqs: list[Request], index: dict[int, int], queue,
                  chat: bool, common: dict, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed response, as OpenAI sends them; cancels on disconnect."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: Optional[str], reason: Optional[str], first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
        return {**common, "object": obj, "choices": [choice]}

    try:
        if chat:
            for r in reqs:
                yield _sse(chunk(index[r.id], None, None, first=True))
        left = len(reqs)
        while left:
            try:
                items = [queue.get_nowait() if not queue.empty() else await _next(queue, 1.0)]
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            while not queue.empty():  # everything that is there (a step's tokens arrive together): one write
                items.append(queue.get_nowait())
            out = []
            for kind, r, text in items:
                if kind == "piece":
                    out.append(_sse(chunk(index[r.id], text, None)))
                elif r.completion.finish_reason == "error":  # as OpenAI reports an error mid-stream
                    out.append(_sse({"error": {"message": f"generation failed: {r.completion.text}",
                                               "type": "server_error", "param": None, "code": "internal_error"}}))
                    yield "".join(out)
                    return
                else:
                    left -= 1
                    out.append(_sse(chunk(index[r.id], None, _finish_reason(r.completion.finish_reason))))
            yield "".join(out)
        if include_usage:
            yield _sse({**common, "object": obj, "choices": [], "usage": _usage(reqs)})
        yield "data: [DONE]\n\n"
    finally:
        server.cancel(reqs)  # a no-op once every request is done; frees the rows of a vanished client

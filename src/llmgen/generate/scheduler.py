"""Continuous batching: requests join the running batch at token boundaries and leave it when done.

Every request holds one row ("slot") of a preallocated KV cache while it runs. The rows in use are
kept packed at the top of the cache, decoding rows first:

    rows 0 .. n_ready-1      decoding: each has a sampled token waiting to be fed
    rows n_ready .. n_rows-1 prefilling: their prompt goes into the cache a chunk at a time

One `step()` admits waiting requests into free rows, feeds at most `prefill_chunk` prompt tokens
(so a long prompt never stalls the decoding rows for long), then runs one decode step over all the
decoding rows at once: each row writes its token at its own position and attends only to its own
slots. A row that ends (EOS, stop string, max tokens, the context, the client gone) leaves at once
and the last row moves into its place, so the cache stays packed and the next request gets a row.

Each request samples with its own parameters and its own random generator, so what it produces
does not depend on what else is running (greedy output is the same alone or in a batch of 16:
tested). `run()` drives the loop in the calling thread (generate, chat, eval); `serve()` in a
background thread for the server, which hands requests over with `submit()` and hears back through
each request's callbacks.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llmgen.config import SamplingParams
from llmgen.generate import sampling as S
from llmgen.model.kv_cache import KVCache


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length | cancelled | error (then `text` says what went wrong)
    prompt_tokens: int
    score: Optional[float] = None  # beam search: length-normalised log-probability


SHORT_ROW = 512  # compiled, rows of up to this many slots get a fixed-shape step, longer ones a dynamic one
MIN_PREFIX = 8  # shorter shared starts are prefilled again (a copy is not worth finding them)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefix_tokens: int = 0  # of them, copied from kept prompts (Scheduler.prefix_cache), not computed
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # first call of the compiled step for a new shape (not in decode_s)
    single_steps: int = 0  # decode steps of one row, and their seconds (without compiling; compile_plan)
    single_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


def first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, its sampling, its stops; the scheduler fills in the rest.
    `on_piece(text)` receives streamed text (stop strings held back until they cannot match);
    `on_done(request)` is called once with `completion` set. Both run on the scheduler's thread."""

    ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    stop_text: list[str]
    seed: Optional[int] = None
    on_piece: Optional[Callable[[str], None]] = None
    on_done: Optional[Callable[["Request"], None]] = None
    tag: object = None  # the caller's (e.g. the index of the prompt)
    id: int = field(default_factory=lambda: next(_ids))
    # --- the scheduler's
    generated: list[int] = field(default_factory=list)
    completion: Optional[Completion] = None
    cancelled: bool = False
    prefilled: int = 0  # prompt tokens in the cache
    reused: int = 0  # of them, copied from a kept prompt that starts the same way
    t_submit: float = 0.0
    t_first: Optional[float] = None  # first token sampled
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.gen: Optional[torch.Generator] = None
        self.counts: Optional[torch.Tensor] = None
        self.text, self.emitted = "", 0
        self.decoder = None
        self.max_new = self.params.max_new_tokens

    @property
    def cached(self) -> int:
        """Cache slots this request fills: its prompt, and every sampled token but the newest."""
        return self.prefilled + max(len(self.generated) - 1, 0)

    @property
    def done(self) -> bool:
        return self.completion is not None


class Scheduler:
    """Continuous batching over one engine (see the module docstring). `max_batch` rows of `max_len`
    cache slots each; `prefill_chunk` prompt tokens at most between two decode steps."""

    def __init__(self, engine, max_batch: int = 16, max_len: Optional[int] = None, prefill_chunk: int = 512,
                 stats: Optional[GenerationStats] = None, prefix_cache: int = 0):
        self.engine = engine
        # prompts' KV entries kept after their prefill, up to `prefix_cache` tokens in all (0: none): a new
        # prompt that starts the same way (a system message, a persona, a conversation so far) copies them
        # instead of computing them again. Oldest use goes first.
        self.prefix_cache = prefix_cache
        self.prefixes: list[tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]]] = []
        self.max_batch = max_batch
        self.max_len = min(max_len or engine.cfg.max_seq_len, engine.cfg.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.stats = stats or GenerationStats()
        self.cache: Optional[KVCache] = None
        self.rows: list[Request] = []  # rows[i] holds cache row i
        self.n_ready = 0
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.compiled_now = False  # the current decode step compiled a graph (`_timed`)

    # ------------------------------------------------------------------ clients

    def submit(self, req: Request) -> None:
        if len(req.ids) >= self.max_len:
            raise ValueError(f"prompt of {len(req.ids)} tokens does not fit the {self.max_len}-slot cache")
        req.max_new = max(1, min(req.params.max_new_tokens, self.max_len - len(req.ids)))
        req.t_submit = time.perf_counter()
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: Request) -> None:
        """Stop a request (the client is gone): it leaves at the next token boundary, its row freed."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def run(self, reqs: list[Request]) -> None:
        """Submit `reqs` and step until every one is done (in the calling thread)."""
        for r in reqs:
            self.submit(r)
        while not all(r.done for r in reqs):
            self.step()

    def serve(self, stop: threading.Event, after_step: Callable[[], None] = lambda: None) -> None:
        """The loop of a background thread: step while there is work, sleep until there is. `after_step`
        runs after every step, and after a prefill that gave rows their first tokens, before the decode
        step that follows (the server hands the callbacks' results over in one go: a first token goes
        out one decode step sooner)."""
        while not stop.is_set():
            with self.cond:
                while not (self.waiting or self.rows) and not stop.is_set():
                    self.cond.wait(0.5)
            if not stop.is_set():
                try:
                    self.step(after_step)
                except Exception as e:  # noqa: BLE001  (one bad step must not take the server down)
                    self.fail_all(f"{type(e).__name__}: {e}")
                after_step()
        for r in list(self.rows) + list(self.waiting):  # shutting down: nothing is left hanging
            r.cancelled = True
        self._drop_cancelled()
        after_step()

    def fail_all(self, error: str) -> None:
        """End every request with finish_reason "error" (the step that failed left the cache in an
        unknown state, so the running ones cannot go on); the scheduler itself keeps going."""
        with self.cond:
            reqs = self.rows + list(self.waiting)
            self.rows, self.n_ready = [], 0
            self.waiting.clear()
        for q in reqs:
            if q.completion is None:
                q.completion = Completion(error, [], "error", len(q.ids))
                if q.on_done is not None:
                    q.on_done(q)

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def step(self, first_tokens_out: Callable[[], None] = lambda: None) -> None:
        """Admit waiting requests, feed prompts (a chunk's worth), then one token for every decoding row.
        `first_tokens_out` runs between the two when the prefill gave rows their first tokens."""
        self._drop_cancelled()
        with self.cond:
            while self.waiting and len(self.rows) < self.max_batch:
                req = self.waiting.popleft()
                self._admit(req)
        ready = self.n_ready
        self._prefill()
        if self.n_ready > ready:
            first_tokens_out()
        if self.n_ready:
            self._decode()

    def _admit(self, req: Request) -> None:
        eng = self.engine
        if self.cache is None:  # long rows get a row and a slot spare: the compiled steps take the whole cache
            # and see its first rows and slots, dynamic counts that then always stay below the cache's own (a count
            # equal to a dimension would be specialized: a second graph, compiled mid-run)
            spare = int(self.max_len > SHORT_ROW)
            self.cache = KVCache.allocate(eng.cfg, self.max_batch + spare, self.max_len + spare, eng.device, eng.dtype)
        req.gen = torch.Generator(device=eng.device)
        req.gen.manual_seed(req.seed) if req.seed is not None else req.gen.seed()
        p = req.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            req.counts = torch.zeros(eng.cfg.vocab_size, device=eng.device, dtype=torch.int32)
            req.counts.index_add_(0, torch.tensor(req.ids, device=eng.device),
                                  torch.ones(len(req.ids), device=eng.device, dtype=torch.int32))
        if req.on_piece is not None:
            req.decoder = IncrementalDecoder(eng.tok)
        self.rows.append(req)
        self.stats.prompt_tokens += len(req.ids)
        if self.prefixes and not req.prefilled:
            self._reuse_prefix(len(self.rows) - 1, req)

    def _row_view(self, r: int) -> KVCache:
        return KVCache([k[r:r + 1] for k in self.cache.k], [v[r:r + 1] for v in self.cache.v])

    def _prefill(self) -> None:
        """Feed prompt tokens of the prefilling rows, first come first, up to `prefill_chunk` of them; a
        row whose prompt is all in samples its first token and joins the decoding rows."""
        budget = self.prefill_chunk
        while budget > 0 and self.n_ready < len(self.rows):
            r = self.n_ready
            req = self.rows[r]
            chunk = req.ids[req.prefilled:req.prefilled + budget]
            t0 = time.perf_counter()
            logits = self.engine._forward(torch.tensor([chunk], device=self.engine.device), self._row_view(r),
                                          req.prefilled)
            self.stats.prefill_s += time.perf_counter() - t0
            req.prefilled += len(chunk)
            budget -= len(chunk)
            if req.prefilled < len(req.ids):
                break  # the rest of this prompt after the next decode step
            if self.prefix_cache:
                self._keep_prefix(r, req)
            self.n_ready += 1
            self._accept(r, self._sample(logits, [req])[0])

    def _decode(self) -> None:
        eng, D = self.engine, self.n_ready
        reqs = self.rows[:D]
        dev = eng.device
        tok = torch.tensor([q.generated[-1] for q in reqs], device=dev)
        pos = torch.tensor([q.cached for q in reqs], device=dev)  # the slot each row's token goes to
        t0, self.compiled_now = time.perf_counter(), False
        if D == 1 and len(self.rows) == 1 and eng.compiling:
            logits = self._compiled_step(tok, pos)
        elif D == 1:
            logits = eng._forward(tok[:, None], self._row_view(0), reqs[0].cached)
        elif eng.compiling:
            logits = self._compiled_rows(tok, pos)
        else:
            seen = int(pos.max()) + 1
            self.cache.seen = seen
            mask = (torch.arange(seen, device=dev)[None, :] <= pos[:, None])[:, None, None]  # (D, 1, 1, S)
            logits = eng._forward(tok[:, None], self.cache, pos[:, None], mask, pos[:, None])
        nxt = self._sample(logits, reqs)
        now = time.perf_counter()
        if self.compiled_now:
            self.stats.compile_s += now - t0
        else:
            self.stats.decode_s += now - t0
            if D == 1:
                self.stats.single_steps += 1
                self.stats.single_s += now - t0
        for i in reversed(range(D)):  # from the bottom, so a finished row's replacement is already done
            self._accept(i, nxt[i])

    def _compiled_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One row alone: the engine's compiled decode step over its row. A short row (generate sizes it
        for its requests) is taken whole, a fixed shape; of a long one (a server's), only the slots its
        tokens need (`_slots`), as a dynamic dimension (attending over all of a long row would make every
        step cost what the longest request costs): one graph either way."""
        eng = self.engine
        long_row = self.max_len > SHORT_ROW
        size = self._slots(pos) if long_row else self.max_len
        valid = torch.ones(1, size, dtype=torch.bool, device=eng.device)
        if long_row:  # the whole cache goes in, the slot count seen is `valid`'s (dynamic) length: written in
            # place, where a view of the slots would be copied whole into the cache after every step (~1 ms)
            torch._dynamo.mark_dynamic(valid, 1)
            row = self.cache
        else:
            row = self._view(1, size)
        return self._timed((1, self.max_len), eng._compiled, tok, row, pos, valid,
                           torch.zeros(1, dtype=torch.long, device=eng.device))

    def _compiled_rows(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Several rows: the engine's compiled step over the decoding rows and the slots they use, both
        dynamic dimensions: one graph for every batch. Long rows (a server's) pass the whole cache, written
        in place, with the slot count carried by `span`'s length; short ones (generate: every row decoding,
        up to the cache's last slot) pass views of the rows and slots, which the graph copies back whole
        after each step."""
        torch._dynamo.mark_dynamic(tok, 0)
        torch._dynamo.mark_dynamic(pos, 0)
        slots = self._slots(pos)
        if self.max_len > SHORT_ROW:
            span = torch.empty(slots, device=tok.device)
            torch._dynamo.mark_dynamic(span, 0)
            return self._timed(("rows", self.max_len), self.engine._compiled_rows, tok, self.cache, pos, span)
        rows = self._view(tok.shape[0], slots)
        for t in (*rows.k, *rows.v):  # (rows, n_kv_head, slots, head_size)
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 2)
        return self._timed(("rows", self.max_len), self.engine._compiled_rows, tok, rows, pos)

    def _slots(self, pos: torch.Tensor) -> int:
        """How many slots the rows at positions `pos` attend over: up to the furthest, rounded up to a
        multiple of 256 (few sizes; a dynamic dimension in the compiled steps)."""
        return min(self.max_len, (int(pos.max()) // 256 + 1) * 256)

    def _view(self, rows: int, slots: int) -> KVCache:
        """The cache's first `rows` rows and `slots` slots."""
        return KVCache([k[:rows, :, :slots] for k in self.cache.k], [v[:rows, :, :slots] for v in self.cache.v])

    def _timed(self, shape: tuple, step: Callable, *args) -> torch.Tensor:
        """Run a compiled step; its first call for `shape` compiles (`_decode` counts that step's time, the
        compiler's import included, as compile_s)."""
        if shape not in self.engine._compiled_shapes:
            self.engine._compiled_shapes.add(shape)
            self.compiled_now = True
        return step(*args)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row, each with its request's own parameters and generator."""
        plain = [i for i, q in enumerate(reqs) if q.params.temperature == 0.0 and q.counts is None
                 and not q.params.no_repeat_ngram_size]
        out = [0] * len(reqs)
        if plain:  # greedy rows: one argmax (all of them: no gather first, ~30 us a step)
            picks = (logits if len(plain) == len(reqs) else logits[plain]).argmax(-1).tolist()
            for i, t in zip(plain, picks):
                out[i] = t
        for i, q in enumerate(reqs):
            if i in plain:
                continue
            p, row = q.params, logits[i:i + 1]
            if q.counts is not None:
                row = S.repetition_penalty(row, (q.counts > 0)[None], p.repetition_penalty)
                row = S.presence_frequency_penalty(row, q.counts[None], p.presence_penalty, p.frequency_penalty)
            if p.no_repeat_ngram_size:
                row = S.no_repeat_ngram(row, [q.ids + q.generated], p.no_repeat_ngram_size)
            greedy = p.temperature == 0.0
            if not greedy:
                row = S.min_p(S.top_p(S.top_k(S.temperature(row, p.temperature), p.top_k), p.top_p), p.min_p)
            out[i] = int(S.pick(row, greedy, q.gen)[0])
        return out

    def _accept(self, r: int, t: int) -> None:
        """Row r sampled token t: record it, stream it, and finish the request if it ends here."""
        req, now = self.rows[r], time.perf_counter()
        req.generated.append(t)
        req.token_times.append(now)
        if req.t_first is None:
            req.t_first = now
        self.stats.new_tokens += 1
        if req.counts is not None:
            req.counts[t] += 1
        reason = None
        if t in req.stop_ids:
            reason = "stop"
        elif req.decoder is not None:
            req.text += req.decoder.push(t)
            if first_stop(req.text, req.stop_text) >= 0:
                reason = "stop"
            else:
                hold = max((len(s) for s in req.stop_text), default=1) - 1
                safe = len(req.text) - hold
                if safe > req.emitted:
                    req.on_piece(req.text[req.emitted:safe])
                    req.emitted = safe
        elif req.stop_text:
            tail = max(len(s) for s in req.stop_text) * 4 + 8
            if first_stop(self.engine.tok.decode(req.generated[-tail:], skip_special_tokens=True), req.stop_text) >= 0:
                reason = "stop"
        if reason is None and len(req.generated) >= req.max_new:
            reason = "length"
        if reason is not None:
            self._finish(r)

    def _finish(self, r: int, cancelled: bool = False) -> None:
        req = self.rows[r]
        c = self.engine._finish(req.ids, req.generated, req.params, req.stop_ids, req.stop_text)
        if cancelled:
            c.finish_reason = "cancelled"
        req.completion = c
        if req.on_piece is not None and not cancelled and len(c.text) > req.emitted:
            req.on_piece(c.text[req.emitted:])
        self._remove(r)
        if req.on_done is not None:
            req.on_done(req)

    # ------------------------------------------------------------------ rows

    def _drop_cancelled(self) -> None:
        with self.cond:
            gone = [q for q in self.waiting if q.cancelled]
            for q in gone:
                self.waiting.remove(q)
        for q in gone:
            q.completion = self.engine._finish(q.ids, [], q.params, q.stop_ids, q.stop_text)
            q.completion.finish_reason = "cancelled"
            if q.on_done is not None:
                q.on_done(q)
        for r in reversed(range(len(self.rows))):
            if self.rows[r].cancelled:
                self._finish(r, cancelled=True)

    def _reuse_prefix(self, r: int, req: Request) -> None:
        """Copy the longest kept prefix of req's prompt into row r (all of the prompt but its last token at
        most: that one's forward gives the first token's logits); the prefill starts after it."""
        shared = [len(os.path.commonprefix([ids, tuple(req.ids[:-1])])) for ids, _, _ in self.prefixes]
        best = max(shared)
        if best < MIN_PREFIX:
            return
        hit = shared.index(best)
        ids, ks, vs = self.prefixes.pop(hit)
        self.prefixes.append((ids, ks, vs))  # most recently used last
        for t, kept in zip((*self.cache.k, *self.cache.v), (*ks, *vs)):
            t[r, :, :best] = kept[:, :best]
        req.prefilled = req.reused = best
        self.stats.prefix_tokens += best

    def _keep_prefix(self, r: int, req: Request) -> None:
        """Keep row r's prompt entries (just prefilled) for later prompts, dropping the least recently used
        ones past the token budget; a prompt already kept, or the start of one kept, is not kept again."""
        ids = tuple(req.ids)
        n = len(ids)
        if n < MIN_PREFIX or n > self.prefix_cache or any(k[:n] == ids for k, _, _ in self.prefixes):
            return
        self.prefixes = [e for e in self.prefixes if e[0] != ids[:len(e[0])]]  # kept ones this one extends
        self.prefixes.append((ids, [k[r, :, :n].clone() for k in self.cache.k],
                              [v[r, :, :n].clone() for v in self.cache.v]))
        while sum(len(e[0]) for e in self.prefixes) > self.prefix_cache:
            self.prefixes.pop(0)

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        for t in (*self.cache.k, *self.cache.v):
            t[dst, :, :length] = t[src, :, :length]

    def _remove(self, r: int) -> None:
        """Free row r, keeping the rows packed (decoding rows first)."""
        if r < self.n_ready:
            last = self.n_ready - 1
            if r != last:
                self._copy_row(last, r, self.rows[last].cached)
                self.rows[r] = self.rows[last]
            self.n_ready -= 1
            r = last  # the hole is now at the top of the prefilling rows
        end = len(self.rows) - 1
        if r != end:
            self._copy_row(end, r, self.rows[end].cached)
            self.rows[r] = self.rows[end]
        self.rows.pop()

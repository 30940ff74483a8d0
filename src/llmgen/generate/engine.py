"""The decoding engine: one model, its tokenizer and prompt format, and the scheduler that runs
every generation (generate, generate --input-file, chat, eval predictions, the server).

    engine = Engine.load("runs/quickstart")            # or Engine(model, tokenizer, options=EngineOptions())
    result = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=50))
    [[c]] = result                                      # per prompt, its completions; result.stats: timing
    stream = engine.stream("Once upon a time", params)
    for piece in stream: print(piece, end="")          # then stream.completion, stream.stats

Requests are decoded with continuous batching (`scheduler.py`): each holds a row of the KV cache,
joins the batch when a row is free and leaves it when done, with its own sampling parameters and
seed. Sampling is a chain of the pure logits processors in `sampling.py`. Generation ends per
request on EOS, on a stop token, on a stop string (matched on the decoded text, across token
boundaries, and trimmed from the output), or at `max_new_tokens`. Beam search is its own path: it
keeps `num_beams` rows in a cache of its own and reorders it in place.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from typing import Callable, Iterator, Optional, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmgen.config import EngineOptions, SamplingParams
from llmgen.data.chat_format import Messages, PromptFormat
from llmgen.errors import LlmgenError
from llmgen.generate import compile_plan
from llmgen.generate import sampling as S
from llmgen.interop.load import load_model
from llmgen.kernels import bf16_decodes_faster, prepare_for_inference
from llmgen.kernels.precision import choose_dtype, dtype_name
from llmgen.generate.scheduler import (SHORT_ROW, Completion, GenerationStats, Request, Scheduler,
                                       first_stop)
from llmgen.model.kv_cache import KVCache
from llmgen.model.transformer import Transformer

Prompt = Union[str, Messages]


class Generation(list):
    """What `Engine.generate` produced: a list with, per prompt, its completions; `stats` for the call."""

    def __init__(self, completions: list[list[Completion]], stats: GenerationStats):
        super().__init__(completions)
        self.stats = stats


class Stream:
    """What `Engine.stream` produced: iterate for the text pieces; afterwards `completion` holds the whole
    completion (as `generate` would return it for the same seed) and `stats` the call's timing."""

    def __init__(self, pieces: Callable[["Stream"], Iterator[str]], stats: GenerationStats):
        self.completion: Optional[Completion] = None
        self.stats = stats
        self._pieces = pieces(self)

    def __iter__(self) -> Iterator[str]:
        return self._pieces


def check_params(p: SamplingParams) -> None:
    """Reject parameter combinations that cannot mean anything (ranges are checked by the config)."""
    if p.num_return_sequences > 1 and p.num_beams > 1 and p.num_return_sequences > p.num_beams:
        raise LlmgenError(f"num_return_sequences = {p.num_return_sequences} exceeds num_beams = {p.num_beams}; "
                          f"beam search can return at most num_beams sequences")
    if p.num_beams > 1 and p.temperature > 0 and (p.top_k or p.top_p < 1.0 or p.min_p > 0):
        raise LlmgenError("beam search is deterministic: top_k/top_p/min_p sampling cannot be combined with "
                          "num_beams > 1; set --temperature 0 or --num-beams 1")
    if p.num_return_sequences > 1 and p.num_beams == 1 and p.temperature == 0:
        raise LlmgenError("num_return_sequences > 1 with greedy decoding returns the same text every time; "
                          "set --temperature > 0 or use --num-beams")


class Engine:
    def __init__(self, model: Transformer, tokenizer, fmt: Optional[PromptFormat] = None,
                 options: Optional[EngineOptions] = None, source: str = ""):
        options = options or EngineOptions()
        quantize = options.quantize
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype, self.dtype_why = choose_dtype(self.device, options.dtype)
        if self.device.type == "cpu" and options.dtype == "auto":
            if quantize in ("int4", "int8", "fp16"):
                dtype, self.dtype_why = torch.float32, f"the {quantize} weight kernels take fp32 activations"
            elif dtype == torch.bfloat16 and options.work == "decode":  # faster matmuls; faster one-row ones?
                faster, why = bf16_decodes_faster(quantize)
                dtype, self.dtype_why = (torch.bfloat16 if faster else torch.float32), f"{self.dtype_why}; {why}"
        self.model = model.to(self.device, dtype=dtype).eval()
        self.n_params = model.num_params()
        # int8 weights, or q/k/v and gate/up as one matmul each, with fp16 weights where they pay
        self.weights = prepare_for_inference(model, quantize)
        # torch.compile of the one-token decode step over a fixed-size cache (compiled once per batch
        # size and cache bucket; the first generation pays the compile time). Per-call overhead is what
        # a small step costs, so guards skip the model's attributes (the engine never changes the
        # model after this point; inputs' shapes and dtypes are still checked), and on the CPU the
        # graph is called through inductor's C++ wrapper.
        inductor = {}
        if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # torch >= 2.8
            inductor["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        if self.device.type == "cpu":
            inductor["cpp_wrapper"] = True
        # (made on first use: importing the compiler costs ~1 s). compile: auto (None) turns them on per
        # piece of work, where it pays on this machine (`plan`, compile_plan.py)
        self._inductor = inductor
        self.compile_mode = options.compile
        self.compiling = options.compile is True
        self.compile_why = ""
        self._compiled_shapes: set[tuple[int, int]] = set()  # (batch, cache size) already compiled
        self.dtype = dtype
        self.tok = tokenizer
        self.fmt = fmt
        self.source = source
        self.cfg = model.cfg

    @functools.cached_property
    def _compiled(self) -> Callable:
        """The one-row decode step, compiled (`_step`)."""
        return torch.compile(self._own(Engine._step), dynamic=False, options=self._inductor)

    @functools.cached_property
    def _compiled_rows(self) -> Callable:
        """The step of several rows, each at its own position (continuous batching), compiled: row count and
        slot count are dynamic dimensions, so one graph serves every batch (`_rows_step`)."""
        return torch.compile(self._own(Engine._rows_step), dynamic=False, options=self._inductor)

    def _own(self, method: Callable) -> Callable:
        """`method` bound to this engine with a code object of its own. Dynamo keeps compiled graphs per code
        object, and since the guards skip the model, two engines in one process would otherwise share
        graphs (and run one model's kernels, e.g. its packed fp16 weights, for the other)."""
        code = method.__code__.replace(co_name=f"{method.__name__}_{id(self):x}")
        return types.MethodType(types.FunctionType(code, method.__globals__, code.co_name, method.__defaults__,
                                                   method.__closure__), self)

    def describe(self) -> str:
        """One line on the path this engine decodes with: device, precision and why, kernels."""
        parts = [str(self.device), f"{dtype_name(self.dtype)} ({self.dtype_why})"]
        parts += [self.weights] if self.weights else []
        why = f" ({self.compile_why})" if self.compile_why else ""
        parts += [f"compiled decode step{why}"] if self.compiling else [f"eager decode step{why}"] if why else []
        return ", ".join(parts)

    def plan(self, steps: int, what: str, long: Optional[bool] = None) -> None:
        """With generate.compile auto: use the compiled decode step for the work ahead, about `steps` decode
        steps of `what` (in rows of more than SHORT_ROW slots: `long`, default when `steps` exceeds it), if
        compiling pays for it on this machine (compile_plan.py); its reason goes into `describe`. Explicit
        settings, and a choice already made to compile, stand."""
        if self.compile_mode is not None or self.compiling:
            return
        after, basis = compile_plan.pays_after(self.plan_key, steps > SHORT_ROW if long is None else long)
        self.compiling = after is not None and steps >= after
        pays = (basis if after is None else f"compiling pays after {after:,} steps, {basis}" if after < sys.maxsize
                else f"compiling never pays, {basis}")
        self.compile_why = f"auto: {what} ~{steps:,} steps; {pays}"

    def warm_up(self, session: bool = False) -> float:
        """Compile the one-row decode step now (a chat session's, with `session`), not in the middle of the
        first answer; seconds it took (0 when not compiling or already compiled)."""
        if not self.compiling:
            return 0.0
        stream = self.stream("Hi", SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True), session=session)
        for _ in stream:
            pass
        return stream.stats.compile_s

    @functools.cached_property
    def plan_key(self) -> str:
        c = self.cfg
        return compile_plan.key(self.device, self.dtype, self.weights,
                                f"{c.arch} {c.n_layer}x{c.d_model} {c.n_head}/{c.n_kv} heads vocab {c.vocab_size}")

    def _learn(self, stats: GenerationStats, slots: int) -> None:
        """Add this generation's timings (one-row decode step, compile) to the record `plan` decides from,
        for rows of its length class (`slots`: short rows have a graph of their own)."""
        if self.device.type in ("cpu", "cuda"):
            compile_plan.note(self.plan_key, slots > SHORT_ROW, self.compiling, stats.single_steps,
                              stats.single_s, stats.compile_s)

    @classmethod
    def load(cls, path: Optional[str] = None, run_dir: str = "runs/quickstart",
             options: Optional[EngineOptions] = None, fmt: Optional[PromptFormat] = None) -> "Engine":
        """The engine for a model anything `--model` accepts names; `fmt` overrides its prompt format."""
        lm = load_model(path, run_dir)
        return cls(lm.model, lm.tokenizer, fmt or lm.prompt_format, options, str(lm.folder))

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, prompt: Prompt, p: SamplingParams, system: Optional[str] = None) -> list[int]:
        """Token ids for a prompt: plain text, or messages rendered with the model's prompt format."""
        fmt = self.format_for([prompt], p, system)
        if fmt is not None:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            msgs = ([{"role": "system", "content": system}] if system else []) + turns
            ids = self.tok.encode(fmt.prompt(self.tok, msgs), specials=True)
        else:
            ids = self.tok.encode(prompt)
        if not ids:
            ids = [self.tok.eot_id]  # an empty prompt starts a new document
        ctx = self.cfg.max_seq_len
        if len(ids) >= ctx:
            if not p.truncate_prompt:
                raise LlmgenError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}; shorten it or "
                                  f"pass --truncate-prompt to keep its last tokens")
            ids = ids[-max(1, ctx - min(p.max_new_tokens, ctx // 2)):]
        elif p.truncate_prompt and len(ids) + p.max_new_tokens > ctx:
            ids = ids[-max(1, ctx - p.max_new_tokens):]
        return ids

    def format_for(self, prompts: list[Prompt], p: SamplingParams, system: Optional[str] = None) -> Optional[PromptFormat]:
        """The prompt format these prompts are rendered with: the model's (unless `raw`), and for message
        lists, or text given a `system` prompt, its tokenizer's chat template when it was not
        instruction-finetuned (an imported instruction model); None = plain text."""
        if any(isinstance(x, list) for x in prompts) or (system and not p.raw):
            return self.fmt or PromptFormat.choose(self.tok, None)
        return self.fmt if not p.raw else None

    def _stops(self, p: SamplingParams, fmt: Optional[PromptFormat]) -> tuple[set[int], list[str]]:
        """Stop token ids (EOS, special tokens named as stops) and text-level stop strings. `ignore_eos`
        (fixed-length outputs for benchmarks) also ignores the prompt format's end of turn, as llama.cpp
        ignores every end-of-generation token; stops the request names still apply."""
        strings = list(p.stop) + (fmt.stops(self.tok) if fmt is not None and not p.ignore_eos else [])
        ids = set() if p.ignore_eos else {self.tok.eot_id}
        text = []
        for s in strings:
            tid = self.tok.token_id(s)
            special = tid is not None and s in {t.content for t in self.tok.tok.get_added_tokens_decoder().values()}
            if special:
                ids.add(tid)
            elif s:
                text.append(s)
        return ids, text

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[Prompt], p: SamplingParams, system: Optional[str] = None,
                 max_batch: int = 32) -> Generation:
        """Completions for every prompt (num_return_sequences each), in the prompts' order."""
        stats = GenerationStats()
        outs: dict[int, list[Completion]] = dict(self.generate_each(prompts, p, system, max_batch, stats))
        return Generation([outs[i] for i in range(len(prompts))], stats)

    def generate_each(self, prompts: list[Prompt], p: SamplingParams, system: Optional[str] = None,
                      max_batch: int = 32, stats: Optional[GenerationStats] = None
                      ) -> Iterator[tuple[int, list[Completion]]]:
        """(prompt index, its completions) as each prompt finishes, up to `max_batch` sequences running at
        once (continuous batching: a finished one's row goes to the next prompt at once). Bad parameters
        and prompts are refused before anything runs."""
        check_params(p)
        stats = stats if stats is not None else GenerationStats()
        rows = [self.prompt_ids(x, p, system) for x in prompts]
        stops = self._stops(p, self.format_for(prompts, p, system))
        if p.num_beams > 1:
            for i, r in enumerate(rows):
                stats.prompt_tokens += len(r)
                yield i, self._beam_search(r, p, stops, stats)
            return
        n = p.num_return_sequences
        finished: list[Request] = []
        reqs = [Request(r, p, *stops, seed=None if p.seed is None else p.seed + k, tag=i, on_done=finished.append)
                for i, r in enumerate(rows) for k in range(n)]
        sched = self._scheduler(reqs, max_batch, stats)
        for q in reqs:
            sched.submit(q)
        got: dict[int, list[Request]] = {}
        for _ in reqs:  # one finished request per turn
            while not finished:
                sched.step()
            q = finished.pop(0)
            got.setdefault(q.tag, []).append(q)
            if len(got[q.tag]) == n:
                yield q.tag, [x.completion for x in sorted(got.pop(q.tag), key=lambda x: x.id)]
        self._learn(stats, sched.max_len)

    def stream(self, prompt: Prompt, p: SamplingParams, system: Optional[str] = None, session: bool = False) -> Stream:
        """Text pieces as they are produced (one prompt, sampling or greedy); see `Stream`. Bad
        parameters and prompts are refused here, before the first piece. `session`: one turn of a
        conversation that grows (compiled, its steps use one graph for every turn's length)."""
        check_params(p)
        if p.num_beams > 1 or p.num_return_sequences > 1:
            raise LlmgenError("streaming prints one sequence; use --no-stream with num_beams or num_return_sequences")
        ids = self.prompt_ids(prompt, p, system)
        stops = self._stops(p, self.format_for([prompt], p, system))

        def pieces(out: Stream) -> Iterator[str]:
            buf: list[str] = []
            req = Request(ids, p, *stops, seed=p.seed, on_piece=buf.append)
            sched = self._scheduler([req], 1, out.stats, self.cfg.max_seq_len if session else None)
            sched.submit(req)
            while not req.done:
                sched.step()
                yield from buf
                buf.clear()
            yield from buf
            out.completion = req.completion
            self._learn(out.stats, sched.max_len)

        return Stream(pieces, GenerationStats())

    def scheduler(self, max_batch: int = 16, max_len: Optional[int] = None, prefix_cache_mb: int = 0) -> Scheduler:
        """A long-lived scheduler for a server: `max_batch` rows of `max_len` slots (default: the context),
        keeping up to `prefix_cache_mb` of prompts' KV entries for prompts that start the same way."""
        c = self.cfg
        per_token = 2 * c.n_layer * c.n_kv * c.head_size * self.dtype.itemsize  # bytes of K and V a token
        return Scheduler(self, max_batch=max_batch, max_len=max_len, prefix_cache=prefix_cache_mb * 2 ** 20 // per_token)

    def _scheduler(self, reqs: list[Request], max_batch: int, stats: GenerationStats,
                   slots: Optional[int] = None) -> Scheduler:
        """A scheduler sized for a known set of requests: rows for as many as may run at once, and slots
        for the longest (rounded up to a multiple of 256 when compiled, so compiled steps are reused), or
        `slots` when compiled (a chat turn: a long row, whose compiled step attends over the slots in use)."""
        need = max(len(q.ids) + q.params.max_new_tokens for q in reqs)
        if self.compiling:
            need = max(-(-need // 256) * 256, slots or 0)
        return Scheduler(self, max_batch=max(1, min(len(reqs), max_batch)), max_len=min(need, self.cfg.max_seq_len),
                         stats=stats)

    # ------------------------------------------------------------------ decoding

    def _logits(self, idx, cache, pos, mask=None, positions=None) -> torch.Tensor:
        logits = self.model(idx, cache=cache, pos=pos, attn_mask=mask, positions=positions, last_only=True)
        return logits[:, -1].float()  # (B, V)

    def _step(self, tok, cache, pos, valid, pad) -> torch.Tensor:
        """One decode step over the whole fixed-size cache (the compiled path): tok (B,) the newest
        tokens, pos (1,) the slot they go to, valid (B, S) the slots holding real tokens (False for
        left padding), pad (B,) each row's padding. The mask and positions are made inside the graph."""
        S = valid.shape[1]
        seen = torch.arange(S, device=pos.device) <= pos  # (S,)
        mask = (valid & seen)[:, None, None]  # (B, 1, 1, S)
        if cache.k[0].shape[2] > S:  # a long row: the whole cache, of which the first S slots are seen; written
            # per row (in place into the whole tensor), row 0 being the one decoding
            return self._logits(tok[:, None], KVCache(cache.k, cache.v, seen=S), pos[None, :], mask,
                                (pos - pad)[:, None])
        return self._logits(tok[:, None], cache, pos, mask, (pos - pad)[:, None])

    def _rows_step(self, tok, cache, pos, span=None) -> torch.Tensor:
        """One decode step of D rows each at its own position (the compiled batch path): tok (D,) the
        newest tokens, pos (D,) the slot each goes to, cache views of D rows of S slots (S covering
        every row's tokens), or the whole cache with S = len(span) (written in place; D and S below the
        cache's rows and slots); each row attends to its own slots up to its position."""
        S = cache.k[0].shape[2] if span is None else span.shape[0]
        if span is not None:
            torch._check(tok.shape[0] < cache.k[0].shape[0])
            torch._check(S < cache.k[0].shape[2])
        rows = KVCache(cache.k, cache.v, seen=S)
        mask = (torch.arange(S, device=pos.device)[None, :] <= pos[:, None])[:, None, None]  # (D, 1, 1, S)
        return self._logits(tok[:, None], rows, pos[:, None], mask, pos[:, None])

    def _forward(self, idx, cache, pos, mask=None, positions=None) -> torch.Tensor:
        if self.device.type != "cuda":
            return self._logits(idx, cache, pos, mask, positions)
        # cuDNN attention builds a new plan for every new key length (~10 ms each): one per decode step
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return self._logits(idx, cache, pos, mask, positions)

    def _finish(self, prompt: list[int], new: list[int], p: SamplingParams, stop_ids: set[int],
                stop_text: list[str], score: Optional[float] = None) -> Completion:
        """Cut a row's new tokens at its first stop and decode them."""
        reason = "length"
        for j, t in enumerate(new):
            if t in stop_ids:
                new, reason = new[:j], ("eos" if t == self.tok.eot_id else "stop")
                break
        text = self.tok.decode(new, skip_special_tokens=True)
        cut = first_stop(text, stop_text)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            # keep only the tokens that make up the kept text
            while new and len(self.tok.decode(new[:-1], skip_special_tokens=True)) >= cut:
                new = new[:-1]
        return Completion(text, new, reason, len(prompt), score)

    @torch.inference_mode()
    def _beam_search(self, ids: list[int], p: SamplingParams, stops: tuple[set[int], list[str]],
                     stats: GenerationStats) -> list[Completion]:
        """Beam search over one prompt; returns the best num_return_sequences hypotheses."""
        nb, L = p.num_beams, len(ids)
        max_new = min(p.max_new_tokens, self.cfg.max_seq_len - L)
        stop_ids, stop_text = stops
        cache = KVCache.allocate(self.cfg, nb, L + max_new, self.device, self.dtype)
        t0 = time.perf_counter()
        logits = self._forward(torch.tensor([ids], device=self.device), cache, 0)
        cache.reorder(torch.zeros(nb, dtype=torch.long, device=self.device), L)  # all beams share the prefix
        logits = logits.expand(nb, -1)
        scores = torch.full((nb,), float("-inf"), device=self.device)
        scores[0] = 0.0
        beams: list[list[int]] = [[] for _ in range(nb)]
        finished: list[tuple[float, list[int], str]] = []

        def norm(score: float, length: int) -> float:
            return score / (max(length, 1) ** p.length_penalty)

        for step in range(max_new):
            if p.repetition_penalty != 1.0 or p.no_repeat_ngram_size:
                seen = torch.zeros(nb, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
                for b in range(nb):
                    seen[b, ids + beams[b]] = True
                logits = S.repetition_penalty(logits, seen, p.repetition_penalty)
                logits = S.no_repeat_ngram(logits, [ids + b for b in beams], p.no_repeat_ngram_size)
            logp = S.temperature(logits, p.temperature if p.temperature > 0 else 1.0).log_softmax(-1)
            cand = (scores[:, None] + logp).view(-1)
            top_scores, top_idx = cand.topk(2 * nb)
            V = logp.size(-1)
            nxt: list[tuple[float, int, int]] = []
            for sc, ix in zip(top_scores.tolist(), top_idx.tolist()):
                b, t = divmod(ix, V)
                if sc == float("-inf"):
                    break
                if t in stop_ids:
                    finished.append((norm(sc, len(beams[b]) + 1), beams[b], "eos" if t == self.tok.eot_id else "stop"))
                else:
                    nxt.append((sc, b, t))
                if len(nxt) == nb:
                    break
            finished.sort(key=lambda h: -h[0])
            if len(finished) >= nb:
                if p.early_stopping:
                    break
                best_running = max(s for s, _, _ in nxt) if nxt else float("-inf")
                if norm(best_running, len(beams[0]) + 1) <= finished[nb - 1][0]:
                    break
            if not nxt:
                break
            src = torch.tensor([b for _, b, _ in nxt], device=self.device)
            cache.reorder(src, L + step)
            beams = [beams[b] + [t] for _, b, t in nxt]
            scores = torch.tensor([s for s, _, _ in nxt], device=self.device)
            stats.new_tokens += 1
            if step == max_new - 1:
                break
            logits = self._forward(torch.tensor([[t] for _, _, t in nxt], device=self.device), cache, L + step)
        for s, b in zip(scores.tolist(), beams):
            if len(finished) < nb or not p.early_stopping:
                finished.append((norm(s, len(b)), b, "length"))
        finished.sort(key=lambda h: -h[0])
        stats.decode_s += time.perf_counter() - t0
        out = []
        for sc, toks, reason in finished[:p.num_return_sequences]:
            c = self._finish(ids, toks, p, stop_ids, stop_text, score=sc)
            if reason != "length" and c.finish_reason == "length":
                c.finish_reason = reason
            out.append(c)
        return out

"""The decoding engine: prefill the prompts, then decode token by token from a preallocated KV cache.

    engine = Engine.load("runs/quickstart")            # or Engine(model, tokenizer, options=EngineOptions())
    result = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=50))
    [[c]] = result                                      # per prompt, its completions; result.stats: timing
    stream = engine.stream("Once upon a time", params)
    for piece in stream: print(piece, end="")          # then stream.completion, stream.stats

Prompts of different lengths share one batch: they are left-padded, every row gets its own
positions, and an attention mask hides the padding. Sampling is a chain of the pure logits
processors in `sampling.py`. Generation ends per row on EOS, on a stop token, on a stop string
(matched on the decoded text, across token boundaries, and trimmed from the output), or at
`max_new_tokens`. Beam search keeps `num_beams` rows in the cache and reorders it in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmgen.config import EngineOptions, SamplingParams
from llmgen.data.chat_format import Messages, PromptFormat
from llmgen.errors import LlmgenError
from llmgen.generate import sampling as S
from llmgen.interop.load import load_model
from llmgen.kernels import prepare_for_inference
from llmgen.kernels.precision import choose_dtype, dtype_name
from llmgen.model.kv_cache import KVCache
from llmgen.model.transformer import Transformer

Prompt = Union[str, Messages]


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length
    prompt_tokens: int
    score: Optional[float] = None  # beam search: length-normalised log-probability


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # first call of the compiled step for a new shape (not in decode_s)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


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


def _first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


class Engine:
    def __init__(self, model: Transformer, tokenizer, fmt: Optional[PromptFormat] = None,
                 options: Optional[EngineOptions] = None, source: str = "", fuse: bool = True):
        options = options or EngineOptions()
        quantize = options.quantize
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype, self.dtype_why = choose_dtype(self.device, options.dtype)
        self.model = model.to(self.device, dtype=dtype).eval()
        self.n_params = model.num_params()
        if fuse or quantize:  # int8 weights, or q/k/v and gate/up as one matmul each (no extra memory)
            prepare_for_inference(model, quantize)
        self.quantize = quantize
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
        self._compiled = torch.compile(self._step, dynamic=False, options=inductor) if options.compile else None
        self._compiled_shapes: set[tuple[int, int]] = set()  # (batch, cache size) already compiled
        self.dtype = dtype
        self.tok = tokenizer
        self.fmt = fmt
        self.source = source
        self.cfg = model.cfg

    def describe(self) -> str:
        """One line on the path this engine decodes with: device, precision and why, kernels."""
        parts = [str(self.device), f"{dtype_name(self.dtype)} ({self.dtype_why})"]
        parts += [f"{self.quantize} weights"] if self.quantize else []
        parts += ["compiled decode step"] if self._compiled is not None else []
        return ", ".join(parts)

    @classmethod
    def load(cls, path: Optional[str] = None, run_dir: str = "runs/quickstart",
             options: Optional[EngineOptions] = None, fmt: Optional[PromptFormat] = None) -> "Engine":
        """The engine for a model anything `--model` accepts names; `fmt` overrides its prompt format."""
        lm = load_model(path, run_dir)
        return cls(lm.model, lm.tokenizer, fmt or lm.prompt_format, options, str(lm.folder))

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, prompt: Prompt, p: SamplingParams, system: Optional[str] = None) -> list[int]:
        """Token ids for a prompt: plain text, or messages rendered with the model's prompt format."""
        fmt = self.format_for([prompt], p)
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

    def format_for(self, prompts: list[Prompt], p: SamplingParams) -> Optional[PromptFormat]:
        """The prompt format these prompts are rendered with: the model's (unless `raw`), and for message
        lists its tokenizer's chat template when it was not instruction-finetuned; None = plain text."""
        if any(isinstance(x, list) for x in prompts):
            return self.fmt or PromptFormat.choose(self.tok, None)
        return self.fmt if not p.raw else None

    def _stops(self, p: SamplingParams, fmt: Optional[PromptFormat]) -> tuple[set[int], list[str]]:
        """Stop token ids (EOS, special tokens named as stops) and text-level stop strings."""
        strings = list(p.stop) + (fmt.stops(self.tok) if fmt is not None else [])
        ids = {self.tok.eot_id}
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

    def generate(self, prompts: list[Prompt], p: SamplingParams, system: Optional[str] = None) -> Generation:
        """Completions for every prompt (num_return_sequences each), batched."""
        check_params(p)
        rows = [self.prompt_ids(x, p, system) for x in prompts]
        stats = GenerationStats(prompt_tokens=sum(map(len, rows)))
        gen = torch.Generator(device=self.device)
        if p.seed is not None:
            gen.manual_seed(p.seed)
        else:
            gen.seed()
        stops = self._stops(p, self.format_for(prompts, p))
        if p.num_beams > 1:
            return Generation([self._beam_search(r, p, stops, stats) for r in rows], stats)
        n = p.num_return_sequences
        expanded = [r for r in rows for _ in range(n)]
        outs = self._decode_batch(expanded, p, gen, stops, stats)
        return Generation([outs[i * n:(i + 1) * n] for i in range(len(rows))], stats)

    def stream(self, prompt: Prompt, p: SamplingParams, system: Optional[str] = None) -> Stream:
        """Text pieces as they are produced (one prompt, sampling or greedy); see `Stream`. Bad
        parameters and prompts are refused here, before the first piece."""
        check_params(p)
        if p.num_beams > 1 or p.num_return_sequences > 1:
            raise LlmgenError("streaming prints one sequence; use --no-stream with num_beams or num_return_sequences")
        ids = self.prompt_ids(prompt, p, system)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(p.seed) if p.seed is not None else gen.seed()
        stops = self._stops(p, self.format_for([prompt], p))
        return Stream(lambda out: self._stream_pieces(ids, p, gen, stops, out), GenerationStats(prompt_tokens=len(ids)))

    def _stream_pieces(self, ids: list[int], p: SamplingParams, gen: torch.Generator,
                       stops: tuple[set[int], list[str]], out: Stream) -> Iterator[str]:
        stop_ids, stop_text = stops
        hold = max((len(s) for s in stop_text), default=1) - 1
        dec = IncrementalDecoder(self.tok)
        text, emitted = "", 0
        new: list[int] = []
        for generated in self._steps([ids], p, gen, out.stats):
            new = generated[0]
            t = new[-1]
            if t in stop_ids:
                break
            text += dec.push(t)
            cut = _first_stop(text, stop_text)
            if cut >= 0:
                text = text[:cut]
                break
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        out.completion = self._finish(ids, new, p, stop_ids, stop_text)
        final = out.completion.text
        if len(final) > emitted:
            yield final[emitted:]

    # ------------------------------------------------------------------ decoding

    def _logits(self, idx, cache, pos, mask=None, positions=None) -> torch.Tensor:
        logits = self.model(idx, cache=cache, pos=pos, attn_mask=mask, positions=positions, last_only=True)
        return logits[:, -1].float()  # (B, V)

    def _step(self, tok, cache, pos, valid, pad) -> torch.Tensor:
        """One decode step over the whole fixed-size cache (the compiled path): tok (B,) the newest
        tokens, pos (1,) the slot they go to, valid (B, S) the slots holding real tokens (False for
        left padding), pad (B,) each row's padding. The mask and positions are made inside the graph."""
        seen = torch.arange(valid.shape[1], device=pos.device) <= pos  # (S,)
        mask = (valid & seen)[:, None, None]  # (B, 1, 1, S)
        return self._logits(tok[:, None], cache, pos, mask, (pos - pad)[:, None])

    def _forward(self, idx, cache, pos, mask=None, positions=None) -> torch.Tensor:
        if self.device.type != "cuda":
            return self._logits(idx, cache, pos, mask, positions)
        # cuDNN attention builds a new plan for every new key length (~10 ms each): one per decode step
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return self._logits(idx, cache, pos, mask, positions)

    @torch.inference_mode()
    def _steps(self, rows: list[list[int]], p: SamplingParams, gen: torch.Generator,
               stats: GenerationStats) -> Iterator[list[list[int]]]:
        """Yield every row's new tokens so far, one more each step (timing goes to `stats`). The caller
        decides when to stop (it simply stops iterating)."""
        B, L = len(rows), max(map(len, rows))
        max_new = min(p.max_new_tokens, self.cfg.max_seq_len - L)
        dev = self.device
        size = L + max_new
        if self._compiled is not None:  # a few fixed cache sizes, so the compiled step is reused
            size = min(self.cfg.max_seq_len, -(-size // 256) * 256)
        cache = KVCache.allocate(self.cfg, B, size, dev, self.dtype)
        pads = [L - len(r) for r in rows]
        idx = torch.tensor([[self.tok.pad_id or 0] * pad + r for pad, r in zip(pads, rows)], device=dev)
        ragged = any(pads)
        mask = positions = None
        pad_t = torch.tensor(pads, device=dev)
        valid = torch.arange(size, device=dev)[None, :] >= pad_t[:, None]  # (B, S): slot holds a real token
        if ragged:
            positions = (torch.arange(L, device=dev)[None, :] - pad_t[:, None]).clamp(min=0)  # (B, L)
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
            mask = (causal[None] & valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=dev)[None]
            mask = mask[:, None]  # (B, 1, L, L)
        t0 = time.perf_counter()
        logits = self._forward(idx, cache, 0, mask, positions)
        stats.prefill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        greedy = p.temperature == 0.0
        penalties = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        counts = None
        if penalties:
            counts = torch.zeros(B, self.cfg.vocab_size, device=dev, dtype=torch.int32)
            for i, r in enumerate(rows):
                counts[i].index_add_(0, torch.tensor(r, device=dev), torch.ones(len(r), device=dev, dtype=torch.int32))
        generated: list[list[int]] = [[] for _ in range(B)]
        for step in range(max_new):
            if penalties:
                logits = S.repetition_penalty(logits, counts > 0, p.repetition_penalty)
                logits = S.presence_frequency_penalty(logits, counts, p.presence_penalty, p.frequency_penalty)
            if p.no_repeat_ngram_size:
                logits = S.no_repeat_ngram(logits, [r + g for r, g in zip(rows, generated)], p.no_repeat_ngram_size)
            if not greedy:
                logits = S.min_p(S.top_p(S.top_k(S.temperature(logits, p.temperature), p.top_k), p.top_p), p.min_p)
            nxt = S.pick(logits, greedy, gen)  # (B,)
            if counts is not None:
                counts[torch.arange(B, device=dev), nxt] += 1
            tokens = nxt.tolist()
            for g, t in zip(generated, tokens):
                g.append(t)
            stats.new_tokens += B
            stats.decode_s = time.perf_counter() - t0 - stats.compile_s
            yield generated
            if step == max_new - 1:
                break
            pos = L + step
            if self._compiled is not None:
                t1, new_shape = time.perf_counter(), (B, size) not in self._compiled_shapes
                logits = self._compiled(nxt, cache, torch.tensor([pos], device=dev), valid, pad_t)
                if new_shape:  # this call compiled the step (or loaded it from inductor's cache)
                    self._compiled_shapes.add((B, size))
                    stats.compile_s += time.perf_counter() - t1
                continue
            step_mask = valid[:, None, None, :pos + 1] if ragged else None
            step_pos = (pos - pad_t)[:, None] if ragged else None
            logits = self._forward(nxt[:, None], cache, pos, step_mask, step_pos)

    def _decode_batch(self, rows: list[list[int]], p: SamplingParams, gen: torch.Generator,
                      stops: tuple[set[int], list[str]], stats: GenerationStats) -> list[Completion]:
        stop_ids, stop_text = stops
        done = [False] * len(rows)
        tail = max((len(s) for s in stop_text), default=0) * 4 + 8
        generated: list[list[int]] = [[] for _ in rows]
        for generated in self._steps(rows, p, gen, stats):
            for i, g in enumerate(generated):
                if done[i]:
                    continue
                if g[-1] in stop_ids:
                    done[i] = True
                elif stop_text:
                    if _first_stop(self.tok.decode(g[-tail:], skip_special_tokens=True), stop_text) >= 0:
                        done[i] = True
            if all(done):
                break
        return [self._finish(r, g, p, stop_ids, stop_text) for r, g in zip(rows, generated)]

    def _finish(self, prompt: list[int], new: list[int], p: SamplingParams, stop_ids: set[int],
                stop_text: list[str], score: Optional[float] = None) -> Completion:
        """Cut a row's new tokens at its first stop and decode them."""
        reason = "length"
        for j, t in enumerate(new):
            if t in stop_ids:
                new, reason = new[:j], ("eos" if t == self.tok.eot_id else "stop")
                break
        text = self.tok.decode(new, skip_special_tokens=True)
        cut = _first_stop(text, stop_text)
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

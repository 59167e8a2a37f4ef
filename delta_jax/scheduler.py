"""Continuous batching over the paged KV cache: a waiting queue, decode slots, admission by free pages.

Each scheduling step (`Scheduler.step`):
1. releases slots whose requests stopped on the host (stop string, cancellation) and frees their pages;
2. admits waiting requests while a slot and enough free pages exist (pages for the prompt plus
   `max_tokens`, reserved at admission, so a running request never runs out), prefills each whole prompt
   (batched when several fit one compiled shape, up to `PREFILL_BATCH_TOKENS`) straight into its pages, and
   inserts the rows into their slots;
3. dispatches one chunk of `chunk` decode steps on the device (`delta_jax.steps`);
4. reads the previous chunk's tokens while this one runs, streams them, and retires finished requests.

`Engine.generate` and `delta-jax serve` both drive this one decode path.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from delta_jax import cache, memory, sampling, sharding
from delta_jax.cache import CacheSpec, PageAllocator
from delta_jax.config import ConfigError, DecodeConfig, PrefillConfig
from delta_jax.steps import Slots, empty_slots

_ids = itertools.count()

# The most (padded) prompt tokens prefilled in one call. On an H100 (Llama-3.1-8B, bf16, 2026-12-07) 4 x 32K
# prompts in one call took 32 us a token and 8 x 32K took 64 us; one 32K prompt alone 36 us.
PREFILL_BATCH_TOKENS = 131072


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its output.

    `on_token(request, token, text_delta)` is called for every new token (from the scheduler's thread);
    `events` receives `("token", token, text_delta)` and finally `("done", finish_reason)`, or `("refused",
    error)` for a request that cannot run here after all (its prefill does not fit the device's free memory).
    finish_reason: "eos" (an end-of-sequence token), "stop" (a stop string), "length" (`max_tokens`), "abort",
    or "error" (refused; `error` says why).
    """

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    on_token: Optional[Callable] = None
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the output's text, set when the request finishes (streamed meanwhile as deltas)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    prefill_seconds: float = 0.0
    ttft_seconds: Optional[float] = None  # from `submit` to the first token, compilation excluded
    compile_seconds: float = 0.0  # compilation between the first token and the finish (excluded from decode times)
    events: "queue.Queue" = dataclasses.field(default_factory=queue.Queue, repr=False)
    _detokenizer: Optional["Detokenizer"] = None
    _held: str = ""         # decoded text not streamed yet: it could still begin a stop string
    _streamed: list = dataclasses.field(default_factory=list, repr=False)  # the text deltas streamed so far
    _compile_mark: float = 0.0
    _slot: int = -1
    _pages: tuple = ()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Detokenizer:
    """The text of a growing list of token ids, decoded incrementally as vLLM and TGI do. Each new token decodes
    again only the tokens since the text before last, so its cost does not grow with the output (decoding the
    whole output per token took 6.5 ms at 32K tokens with SmolLM2's tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the text before the last piece

    def __call__(self, ids: Sequence[int], final: bool = False) -> str:
        """The text that `ids` (the whole list so far) adds; until `final`, none while it ends in an incomplete
        character."""
        seen = self.tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(seen) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(ids)
            return now[len(seen):]
        return ""


class Scheduler:
    """Continuous batching of `slots` decode rows over a pool of `num_pages` pages (see module doc).

    Thread safety: `submit`, `cancel` and `metrics` may be called from any thread; `step` from one.
    """

    def __init__(self, engine, prefill: PrefillConfig, decode: DecodeConfig, *, slots: int, pages_per_seq: int,
                 num_pages: int, chunk: int = 16, max_prefill_tokens: Optional[int] = None):
        self.engine = engine
        self.prefill_method, self.decode_method = prefill, decode
        if decode.method == "delta":
            decode.schedule(engine.config.num_layers)  # validate before compiling
        mesh = engine.mesh
        self.spec = self.cache_spec(engine, decode, slots=slots, pages_per_seq=pages_per_seq, num_pages=num_pages)
        slots = self.spec.slots
        self.chunk = int(chunk)
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1 decode steps, got {chunk}")
        self.max_prefill_tokens = min(max_prefill_tokens or self.spec.max_tokens, PREFILL_BATCH_TOKENS)
        self.alloc = PageAllocator(self.spec)
        self.pages = cache.empty_pool(self.spec, self.pool_sharding(engine, self.spec))
        host = empty_slots(slots, pages_per_seq)
        if mesh is None:
            self.slots = Slots(*(jnp.asarray(x) for x in host))
        else:
            self.slots = Slots(*(jax.device_put(x, sharding.slot_sharding(x.ndim, mesh)) for x in host))
        self.running: list[Optional[Request]] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._pending = None
        self._first: list = []  # (request, first token, active) prefilled this step, streamed after the dispatch
        self._eos = set(engine.eos_ids)
        self.reset_metrics()

    # ------------------------------------------------------------------ requests in
    def check(self, req: Request) -> None:
        """Raises ConfigError when `req` can never run here (one line naming the value)."""
        n, spec = len(req.prompt), self.spec
        check_prompt(req.prompt, self.engine.config.vocab_size)
        if req.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {req.max_tokens}", param="max_tokens")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {req.temperature}, {req.top_p}",
                              param="temperature" if req.temperature < 0 else "top_p")
        if n + req.max_tokens > spec.max_tokens:
            raise ConfigError(f"prompt of {n} tokens plus {req.max_tokens} new tokens exceeds the cache length "
                              f"max_seq_len={spec.max_tokens}", param="prompt")
        need = cache.pages_for(n + req.max_tokens, spec.page_size)
        if need > self.alloc.capacity:
            raise ConfigError(f"prompt of {n} tokens plus {req.max_tokens} new tokens needs {need} pages of "
                              f"{spec.page_size}; the KV cache holds {self.alloc.capacity} per data shard",
                              param="prompt")

    def submit(self, req: Request) -> Request:
        """Queues `req` (validated: raises ConfigError if it can never run)."""
        self.check(req)
        with self._lock:
            req.arrival = time.perf_counter()
            req._compile_mark = self.engine.steps.compile_seconds
            self.waiting.append(req)
            self.stats["requests"] += 1
        return req

    def cancel(self, request_id: str) -> None:
        """Stops a request (a client went away); its slot and pages are released at the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    @staticmethod
    def cache_spec(engine, decode: DecodeConfig, *, slots: int, pages_per_seq: int, num_pages: int) -> CacheSpec:
        """The paged cache a scheduler of these sizes allocates (slots and pages rounded up to the data shards)."""
        shards = engine.mesh.shape["data"] if engine.mesh is not None else 1
        return CacheSpec.for_model(engine.config, page_size=decode.page_size, num_pages=-(-num_pages // shards) * shards,
                                   pages_per_seq=pages_per_seq, slots=-(-slots // shards) * shards, shards=shards,
                                   dtype=jnp.dtype(engine.dtype).name)

    @staticmethod
    def pool_sharding(engine, spec: CacheSpec):
        """The pool's sharding on the engine's mesh (None: one device)."""
        return None if engine.mesh is None else sharding.pool_sharding(cache.pool_shape(spec), engine.mesh)

    def close(self) -> None:
        """Frees the KV pool's and the slots' device memory now (the scheduler cannot step afterwards)."""
        for x in [x for layer in self.pages for x in layer] + list(self.slots):
            x.delete()
        self.pages = ()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.running) or self._pending is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """One scheduling step (see the module doc)."""
        self._release_stopped()
        self._admit()
        dispatched = self._dispatch()
        previous, self._pending = self._pending, dispatched
        self._emit_first()
        if previous is not None:
            self._collect(*previous)

    def run(self) -> None:
        """Steps until every submitted request has finished."""
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------ internals
    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        req.compile_seconds = self.engine.steps.compile_seconds - req._compile_mark
        rest, _ = self._text_delta(req, final=True)
        if rest:
            self._send(req, None, rest)
        self.stats["finished"] += 1
        req.events.put(("done", reason))

    def _release_stopped(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for req in [r for r in self.waiting if r.id in cancelled]:
                self.waiting.remove(req)
                self._finish(req, "abort")
        release = []
        for slot, req in enumerate(self.running):
            if req is not None and req.id in cancelled and not req.done:
                self._finish(req, "abort")
            if req is not None and req.done:
                release.append(slot)
        if not release:
            return
        self.slots = self.engine.steps.deactivate(self.slots, jnp.asarray(release, jnp.int32))
        for slot in release:
            self.alloc.free(self.alloc.shard_of(slot), self.running[slot]._pages)
            self.running[slot] = None

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            while self.waiting:
                req = self.waiting[0]
                need = cache.pages_for(len(req.prompt) + req.max_tokens, self.spec.page_size)
                slot = next((s for s, r in enumerate(self.running) if r is None
                             and self.alloc.free_pages(self.alloc.shard_of(s)) >= need), None)
                if slot is None:
                    break
                self.waiting.popleft()
                req._slot, req._pages = slot, tuple(self.alloc.alloc(self.alloc.shard_of(slot), need))
                self.running[slot] = req
                admitted.append(req)
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.alloc.pages_in_use())
        group: list[Request] = []
        for req in sorted(admitted, key=lambda r: len(r.prompt)):
            if group and self._prefill_tokens(group + [req]) > self.max_prefill_tokens:
                self._prefill(group)
                group = []
            group.append(req)
        if group:
            self._prefill(group)

    def _prefill_tokens(self, group: Sequence[Request]) -> int:
        return cache.ladder(len(group)) * prefill_length(max(len(r.prompt) for r in group))

    def _prefill(self, group: list[Request], waited: bool = False) -> None:
        """Prefills `group` in one batch into its pages and inserts the rows into their slots. A batch that does not
        fit beside the decode chunk in flight (it holds its temporaries until it ends) is checked again after it."""
        b, t = cache.ladder(len(group)), prefill_length(max(len(r.prompt) for r in group))
        w = self.spec.pages_per_seq
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones(b, np.int32)
        row_shard = np.full(b, -1, np.int32)
        seeds = np.zeros(b, np.int32)
        temperature = np.zeros(b, np.float32)
        top_p = np.ones(b, np.float32)
        table = np.zeros((b, w), np.int32)
        for i, r in enumerate(group):
            tokens[i, :len(r.prompt)] = r.prompt
            lengths[i] = len(r.prompt)
            row_shard[i] = self.alloc.shard_of(r._slot)
            seeds[i], temperature[i], top_p[i] = r.seed, r.temperature, r.top_p
            table[i, :len(r._pages)] = r._pages
        steps = self.engine.steps
        t0 = time.perf_counter()
        try:
            first, self.pages = steps.prefill(self.prefill_method, self.engine.state, self.pages, *map(jnp.asarray, (
                tokens, lengths, table, row_shard, seeds, temperature, top_p)), how=sampling.mode(temperature, top_p))
        except memory.DoesNotFit as e:
            if self._pending is not None and not waited:
                jax.block_until_ready(self._pending[0])
                self._prefill(group, waited=True)
            else:
                self._split(group, e)
            return
        first = np.asarray(first)
        seconds = time.perf_counter() - t0 - steps.last_compile_seconds
        self.stats["prefill_tokens"] += int(lengths[:len(group)].sum())
        n = len(group)
        active = np.zeros(n, bool)
        for i, r in enumerate(group):
            r.prefill_seconds = seconds
            active[i] = int(first[i]) not in self._eos and r.max_tokens > 1
            self._first.append((r, int(first[i]), active[i]))
        rows = Slots(page_table=table[:n], tokens=first[:n], positions=lengths[:n], active=active,
                     remaining=np.asarray([r.max_tokens - 1 for r in group], np.int32),
                     counts=np.ones(n, np.int32), seeds=seeds[:n], temperature=temperature[:n], top_p=top_p[:n])
        index = np.asarray([r._slot for r in group], np.int32)
        self.slots = steps.insert(self.slots, jnp.asarray(index), Slots(*map(jnp.asarray, rows)))

    def _split(self, group: list[Request], error: memory.DoesNotFit) -> None:
        """A prefill batch that does not fit the device's free memory: prefills it in halves (and plans no larger
        batch from now on), or refuses a single request with the reason (its slot and pages return at the next
        step)."""
        if len(group) == 1:
            req = group[0]
            req.error, req.finish_reason, req.finish_time = str(error), "error", time.perf_counter()
            self.stats["finished"] += 1
            req.events.put(("refused", req.error))
            return
        half = len(group) // 2
        self.max_prefill_tokens = min(self.max_prefill_tokens, self._prefill_tokens(group[half:]))
        self._prefill(group[:half], waited=True)  # nothing is in flight any more: no chunk runs during admission
        self._prefill(group[half:], waited=True)

    def _emit_first(self) -> None:
        """Streams the first token of each request prefilled in this step (after the next chunk is on its way)."""
        now, compiled = time.perf_counter(), self.engine.steps.compile_seconds
        for r, token, _ in self._first:
            r.first_token_time = now
            r.ttft_seconds = now - r.arrival - (compiled - r._compile_mark)
            r._compile_mark = compiled
            self.stats["ttft"].append(now - r.arrival)
            self._emit(r, token)
        self._first = []

    def _dispatch(self):
        inflight = self.chunk if self._pending is not None else 0
        first = {id(r): active for r, _, active in self._first}  # prefilled this step: not in the chunk in flight

        def needs(r):
            if id(r) in first:
                return first[id(r)]
            return len(r.tokens) + inflight < r.max_tokens

        live = [r for r in self.running if r is not None and not r.done]
        if not any(needs(r) for r in live):
            return None  # the chunk in flight (or the prefill) finishes every live request
        how = sampling.mode([r.temperature for r in live], [r.top_p for r in live])
        self.pages, self.slots, out = self.engine.steps.decode(self.decode_method, self.chunk, self.engine.state,
                                                              self.pages, self.slots, how)
        return out, list(self.running)

    def _collect(self, out, snapshot) -> None:
        tokens = np.asarray(out)
        for slot, req in enumerate(snapshot):
            if req is None or req.done:
                continue
            for tok in tokens[slot]:
                if tok < 0 or req.done:
                    break
                self._emit(req, int(tok))

    def _emit(self, req: Request, token: int) -> None:
        """Records a new token of `req`, streams it, and finishes the request on EOS, a stop string or length."""
        req.tokens.append(token)
        self.stats["tokens"] += 1
        self._token_times.append(time.perf_counter())
        if token in self._eos:
            self._send(req, token, "")
            self._finish(req, "eos")
            return
        delta, stopped = self._text_delta(req)
        self._send(req, token, delta)
        if stopped:
            self._finish(req, "stop")
        elif len(req.tokens) >= req.max_tokens:
            self._finish(req, "length")

    @staticmethod
    def _send(req: Request, token: Optional[int], delta: str) -> None:
        req.events.put(("token", token, delta))
        if req.on_token is not None:
            req.on_token(req, token, delta)

    def _text_delta(self, req: Request, final: bool = False) -> tuple[str, bool]:
        """(new text to stream, whether a stop string appeared). The text is cut before the first stop string;
        until `final`, text that could still begin a stop string, or ends in an incomplete character, is held
        back. Sets `req.text` once the text is complete."""
        tok = self.engine.tokenizer
        if tok is None:
            return "", False
        if req._detokenizer is None:
            req._detokenizer = Detokenizer(tok)
        ids = req.tokens[:-1] if req.finish_reason == "eos" else req.tokens
        text = req._held + req._detokenizer(ids, final)  # a stop string that ends in the new text begins in it
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        keep = 0 if final or cut >= 0 else min(len(text), max((len(s) - 1 for s in req.stop), default=0))
        delta, req._held = text[:len(text) - keep], text[len(text) - keep:]
        if delta:
            req._streamed.append(delta)
        if final or cut >= 0:
            req.text = "".join(req._streamed)
        return delta, cut >= 0

    # ------------------------------------------------------------------ metrics
    def reset_metrics(self) -> None:
        """Restarts the counters, time to first token, tokens/s and peak pages (e.g. after a warm-up). Call it
        from the thread that steps, or while no step runs."""
        with self._lock:
            self.stats = {"requests": 0, "finished": 0, "tokens": 0, "prefill_tokens": 0,
                          "peak_pages": self.alloc.pages_in_use(), "ttft": collections.deque(maxlen=1000)}
            self._token_times = collections.deque(maxlen=4096)

    def metrics(self) -> dict:
        """Queue length, running requests, pages in use, time to first token and recent tokens/s."""
        with self._lock:
            ttft = sorted(self.stats["ttft"])
            times = list(self._token_times)
        window = [t for t in times if t >= time.perf_counter() - 10.0]
        return {
            "waiting": len(self.waiting),
            "running": sum(r is not None and not r.done for r in self.running),
            "slots": self.spec.slots,
            "pages_in_use": self.alloc.pages_in_use(),
            "pages_total": self.spec.shards * self.alloc.capacity,
            "peak_pages_in_use": self.stats["peak_pages"],
            "page_size": self.spec.page_size,
            "requests": self.stats["requests"],
            "finished": self.stats["finished"],
            "generated_tokens": self.stats["tokens"],
            "prefill_tokens": self.stats["prefill_tokens"],
            "ttft_p50_seconds": _quantile(ttft, 0.5),
            "ttft_p99_seconds": _quantile(ttft, 0.99),
            "tokens_per_second": len(window) / 10.0,
        }


def check_prompt(ids, vocab_size: int) -> None:
    """Raises ConfigError for an empty prompt or token ids outside `[0, vocab_size)`."""
    if not ids:
        raise ConfigError("empty prompt: nothing to condition on", param="prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab_size})", param="prompt")


def prefill_length(n: int) -> int:
    """Compiled prompt length for a prompt of `n` tokens: the cache ladder, at least and a multiple of 128."""
    return -(-cache.ladder(n, 128) // 128) * 128


def prefill_lengths(lo: int, hi: int) -> list[int]:
    """The compiled prompt lengths of prompts of `lo` to `hi` tokens, shortest first."""
    out = [prefill_length(lo)]
    while out[-1] < prefill_length(hi):
        out.append(prefill_length(out[-1] + 1))
    return out


def _quantile(xs: list, q: float) -> Optional[float]:
    if not xs:
        return None
    return float(xs[min(len(xs) - 1, int(q * len(xs)))])

"""The jit-compiled steps: prefill into pages, insert into decode slots, and the multi-step decode loop.

The decode loop runs `steps` decode steps per dispatch on the device (a loop of fixed trip count, so the
device never reports a condition to the host between steps): the token buffer, per-slot done flags,
lengths and sampling state stay on the device, and the host reads a chunk's tokens while the next chunk
runs. Compiled shapes: the prefill per
(batch, prompt bucket, pool), the loop per (slots, pages_per_seq, pool); `delta_jax.cache.ladder` bounds them.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delta_jax import cache, memory, sampling, sharding
from delta_jax.config import DecodeConfig, PrefillConfig


class Slots(NamedTuple):
    """Decode state per slot `[slots, ...]`: what the device loop reads and updates."""

    page_table: jax.Array   # int32 [S, pages_per_seq]: local page numbers
    tokens: jax.Array       # int32 [S]: the last sampled token, not yet in the cache
    positions: jax.Array    # int32 [S]: tokens in the cache
    active: jax.Array       # bool [S]
    remaining: jax.Array    # int32 [S]: tokens still to sample after `tokens`
    counts: jax.Array       # int32 [S]: tokens sampled so far (the sampling key's counter)
    seeds: jax.Array        # int32 [S]
    temperature: jax.Array  # float32 [S]
    top_p: jax.Array        # float32 [S]


def empty_slots(slots: int, pages_per_seq: int) -> Slots:
    """Host arrays of `slots` inactive slots."""
    z = np.zeros(slots, np.int32)
    return Slots(np.zeros((slots, pages_per_seq), np.int32), z, z, np.zeros(slots, bool), z, z, z,
                 np.zeros(slots, np.float32), np.ones(slots, np.float32))


def _log(msg: str, progress: bool):
    if progress:
        print(f"[delta-jax] {msg}", file=sys.stderr, flush=True)


class Steps:
    """The compiled steps of one model on one mesh, compiled once per method and shape."""

    def __init__(self, graphdef, mesh, eos: tuple[int, ...], progress: bool):
        self.graphdef = graphdef
        self.mesh = mesh
        self.eos = tuple(sorted(set(eos))) or (-1,)
        self.progress = progress
        self._fns: dict = {}
        self._compiled: dict = {}
        self._memo: dict = {}
        self.last_compile_seconds = 0.0  # compile time spent by the last call (0 when it reused a compile)
        self.compile_seconds = 0.0       # all compile time so far

    # ------------------------------------------------------------------ dispatch with compile logging
    def run(self, key, fn, args, what: str, **jit_kw):
        """`jax.jit(fn, **jit_kw)(*args)`, compiled ahead once per `key` and argument shapes and shardings
        (`key` names everything `fn` closes over: kind, method, static sizes)."""
        return self._run(key, lambda: jax.jit(fn, **jit_kw), args, what)

    def _run(self, key, make, args, what: Optional[str], fits: Optional[str] = None):
        """Compiles (once per signature) and calls; with `fits` (what to change if it does not fit), first
        checks what the call allocates against the device's free memory (`memory.DoesNotFit`)."""
        compiled = self._compile(key, make, args, what)
        if fits is not None:
            memory.check_call(compiled, what, fits, self.mesh)
        return compiled(*args)

    def _compile(self, key, make, args, what: Optional[str]):
        """The executable for `args` (compiled once per signature; `what` is logged)."""
        from delta_jax.delta import KERNEL_BACKEND
        key = (*key, KERNEL_BACKEND)  # the kernel path is part of what a compile means
        if key not in self._fns:
            self._fns[key] = make()
        sig = (key, tuple(self._signature(a) for a in args))
        self.last_compile_seconds = 0.0
        if sig not in self._compiled:
            _log(f"compiling {what}", self.progress and what is not None)
            t0 = time.perf_counter()
            with sharding.use_mesh(self.mesh):
                self._compiled[sig] = self._fns[key].lower(*args).compile()
            self.last_compile_seconds = time.perf_counter() - t0
            self.compile_seconds += self.last_compile_seconds
            _log(f"compiled {what} in {self.last_compile_seconds:.1f}s", self.progress and what is not None)
        return self._compiled[sig]

    def _signature(self, tree):
        """Shapes, dtypes and shardings of `tree`'s leaves; remembered per object for the model state (its
        hundreds of leaves would otherwise be walked at every dispatch)."""
        memo = self._memo.get(id(tree))
        if memo is not None and memo[0] is tree:
            return memo[1]
        leaves = jax.tree.leaves(tree)
        sig = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", "")), getattr(x, "sharding", None))
                    for x in leaves)
        if len(leaves) > 64:
            self._memo[id(tree)] = (tree, sig)
        return sig

    def _shardings(self, pages):
        if self.mesh is None:
            return None, None
        pool = tuple((x.sharding, y.sharding) for x, y in pages)
        return pool, sharding.slot_sharding(1, self.mesh)

    # ------------------------------------------------------------------ prefill
    def _prefill_jit(self, method: PrefillConfig, how: str, pages):
        """The prefill's compile-cache key and its jit maker (shardings from `pages`)."""
        graphdef = self.graphdef

        def fn(state, pages, tokens, lengths, page_table, row_shard, seeds, temperature, top_p):
            model = nnx.merge(graphdef, state)
            h, pages, _ = model.prefill(tokens, lengths, method, cache=(pages, page_table, row_shard))
            last = h[jnp.arange(h.shape[0]), lengths - 1]
            first = sampling.sample(model.logits(last), sampling.row_keys(seeds, jnp.zeros_like(seeds)), temperature,
                                    top_p, how)
            return first, pages

        def make():
            pool, _ = self._shardings(pages)
            kw = {} if pool is None else {"out_shardings": (sharding.replicated(self.mesh), pool)}
            return jax.jit(fn, donate_argnums=(1,), **kw)

        return ("prefill", method, how), make

    def prefill(self, method: PrefillConfig, state, pages, tokens, lengths, page_table, row_shard, seeds,
                temperature, top_p, how: str = "greedy"):
        """Runs prompts `tokens [b, T]` and writes their keys and values into `pages` (donated) through
        `page_table [b, W]`; returns (first sampled token `[b]`, pages). `how`: the sampling code
        (`sampling.mode`). Raises `memory.DoesNotFit` (before running; `pages` untouched) when the compiled
        prefill cannot fit the device's free memory."""
        key, make = self._prefill_jit(method, how, pages)
        return self._run(key, make, (state, pages, tokens, lengths, page_table, row_shard, seeds, temperature, top_p),
                         f"prefill {method.method} for {tuple(tokens.shape)}",
                         fits="a shorter prompt, a smaller KV cache (--kv-pages, --max-seq-len) or --mesh model=N")

    def compile_prefill(self, method: PrefillConfig, state, pages, batch: int, tokens: int, pages_per_seq: int):
        """The greedy prefill of `batch x tokens` into `pages` (the pool that will run it, or its
        `cache.abstract_pool`), compiled as `prefill` compiles it and kept for its calls (for `memory.shortfall`)."""
        ints = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
        args = (state, pages, ints(batch, tokens), jnp.ones((batch,), jnp.int32), ints(batch, pages_per_seq),
                ints(batch), ints(batch), jnp.zeros((batch,), jnp.float32), jnp.ones((batch,), jnp.float32))
        key, make = self._prefill_jit(method, "greedy", pages)
        return self._compile(key, make, args, f"prefill {method.method} for {(batch, tokens)}")

    # ------------------------------------------------------------------ slots
    def insert(self, slots: Slots, index, rows: Slots) -> Slots:
        """Writes `rows` (each field `[n, ...]`) into the slots `index [n]` (donated)."""

        def make():
            kw = {}
            if self.mesh is not None:
                kw["out_shardings"] = Slots(*(sharding.slot_sharding(np.ndim(x), self.mesh) for x in slots))
            return jax.jit(lambda s, i, r: Slots(*(a.at[i].set(b.astype(a.dtype)) for a, b in zip(s, r))),
                           donate_argnums=(0,), **kw)

        return self._run(("insert", None), make, (slots, index, rows), None)  # tiny: compiled silently

    def deactivate(self, slots: Slots, index) -> Slots:
        """Marks the slots `index [n]` inactive (their rows stop writing and attending)."""

        def make():
            kw = {}
            if self.mesh is not None:
                kw["out_shardings"] = Slots(*(sharding.slot_sharding(np.ndim(x), self.mesh) for x in slots))
            return jax.jit(lambda s, i: s._replace(active=s.active.at[i].set(False)), donate_argnums=(0,), **kw)

        return self._run(("deactivate", None), make, (slots, index), None)

    # ------------------------------------------------------------------ decode loop
    def decode(self, method: DecodeConfig, steps: int, state, pages, slots: Slots, how: str = "greedy"):
        """`steps` decode steps for every active slot; `how`: the sampling code (`sampling.mode`).

        Returns (pages, slots, tokens `int32 [S, steps]`: the token each slot sampled at each step, -1
        where it was inactive). A slot stops after an EOS token or when its `remaining` count runs out.
        The trip count is fixed, so the device never reports a loop condition back to the host.
        """
        graphdef, eos = self.graphdef, self.eos

        def fn(state, pages, slots):
            model = nnx.merge(graphdef, state)
            eos_ids = jnp.asarray(eos, jnp.int32)
            out = jnp.full((slots.tokens.shape[0], steps), -1, jnp.int32)

            def body(i, carry):
                pages, s, out = carry
                logits, pages = model.decode(s.tokens, s.positions, s.active, pages, s.page_table, method)
                nxt = sampling.sample(logits, sampling.row_keys(s.seeds, s.counts), s.temperature, s.top_p, how)
                a = s.active
                out = out.at[:, i].set(jnp.where(a, nxt, -1))
                remaining = s.remaining - a
                stop = jnp.any(nxt[:, None] == eos_ids[None, :], -1) | (remaining <= 0)
                s = s._replace(tokens=jnp.where(a, nxt, s.tokens), positions=s.positions + a,
                               active=a & ~stop, remaining=remaining, counts=s.counts + a)
                return pages, s, out

            return jax.lax.fori_loop(0, steps, body, (pages, slots, out))

        def make():
            kw = {}
            pool, row = self._shardings(pages)
            if pool is not None:
                kw["out_shardings"] = (pool, Slots(*(sharding.slot_sharding(np.ndim(x), self.mesh) for x in slots)),
                                       sharding.slot_sharding(2, self.mesh))
            return jax.jit(fn, donate_argnums=(1, 2), **kw)

        return self._run(("decode", method, steps, how), make, (state, pages, slots),
                         f"decode loop ({method.method}, {steps} steps, {how}) for {slots.tokens.shape[0]} slots")

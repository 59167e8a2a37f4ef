"""Blockwise pure-JAX bodies: query tiles, each with an online softmax over its scheduled key
blocks (the same `pallas_kernels.softmax` step as the Pallas bodies). Memory is
O(tiles at once * tile * block_k), never [T, T]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import softmax

from .schedule import Phases, Ranges, phase_bounds, valid_mask


def _tiles(qf, pos, block_rows):
    B, hkv, N, D = qf.shape
    nq = N // block_rows
    return (qf.reshape(B, hkv, nq, block_rows, D).transpose(2, 0, 1, 3, 4),
            pos.reshape(B, nq, block_rows).transpose(1, 0, 2))


def _over_tiles(one, q_tiles, p_tiles, k, v, sched, tiles_at_once):
    """Runs `one(q, t, k, v, *sched)` (a single (batch, kv head, tile)) over every tile, vmapped over
    batch and kv heads, `tiles_at_once` tiles per step of a sequential loop (None: all at once).

    The loop's results start from its first step's, padded. Results started from constants (as `lax.map`'s) get
    buffers that the calls of one program do not share: each layer of a CPU prefill kept its own."""
    per_head = jax.vmap(one, in_axes=(0, None, 0, 0) + (0,) * len(sched))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0) + (0,) * len(sched))
    tile = lambda xs: per_batch(xs[0], xs[1], k, v, *xs[2:])
    xs = (q_tiles, p_tiles) + tuple(jnp.moveaxis(x, 2, 0) for x in sched)
    nq, n = q_tiles.shape[0], tiles_at_once
    if n is None or n >= nq:
        return jax.vmap(tile)(xs)

    def step(start, size):
        return jax.vmap(tile)(tuple(lax.dynamic_slice_in_dim(x, start, size) for x in xs))

    def write(start, size, out):
        return jax.tree.map(lambda o, r: lax.dynamic_update_slice_in_dim(o, r, start, 0), out, step(start, size))

    out = jax.tree.map(lambda r: jnp.pad(r, [(0, nq - n)] + [(0, 0)] * (r.ndim - 1)), step(0, n))
    out = lax.fori_loop(1, nq // n, lambda i, out: write(i * n, n, out), out)
    return write(nq - nq % n, nq % n, out) if nq % n else out


def _key_block(kk, vv, kb, block_k):
    return (lax.dynamic_slice_in_dim(kk, kb * block_k, block_k),
            lax.dynamic_slice_in_dim(vv, kb * block_k, block_k))


def attend(qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks, gamma=None, tiles_at_once=None):
    """Attention of folded query rows over scheduled key blocks.

    qf [B, Hkv, N, D] (N a multiple of block_rows), pos int32 [B, N] (the position of each row),
    k, v [B, Hkv, Tk, D] (Tk a multiple of block_k), schedule: Ranges or Listed per
    (batch, kv_head, tile). Returns out [B, Hkv, N, D] (qf dtype) and lse float32 [B, Hkv, N].
    """
    B, hkv, N, D = qf.shape
    scale, prec = softmax.scale2(D), softmax.precision(qf.dtype)
    if isinstance(schedule, Ranges):
        sched = (schedule.sink_blocks, schedule.lo, schedule.hi)
    else:
        sched = (schedule.indices, schedule.counts)

    def one(q, t, kk, vv, *s):
        if isinstance(schedule, Ranges):
            sink_blocks, lo, hi = s
            count = sink_blocks + hi - lo
            block_at = lambda j: jnp.where(j < sink_blocks, j, lo + j - sink_blocks)
        else:
            indices, count = s
            block_at = lambda j: indices[j]

        def body(j, carry):
            kb = block_at(j)
            kt, vt = _key_block(kk, vv, kb, block_k)
            keep = valid_mask(t[:, None], kb * block_k + jnp.arange(block_k)[None, :], window, sinks, gamma)
            return softmax.update(carry, softmax.logits(q, kt, scale, prec), keep, (vt,), prec)

        (out,), lse2 = softmax.finish(lax.fori_loop(0, count, body, softmax.init(block_rows, (D,))))
        return out.astype(qf.dtype), lse2 * softmax.LN2

    out, lse = _over_tiles(one, *_tiles(qf, pos, block_rows), k, v, sched, tiles_at_once)
    return out.transpose(1, 2, 0, 3, 4).reshape(B, hkv, N, D), lse.transpose(1, 2, 0, 3).reshape(B, hkv, N)


def far_phases(qf, pos, k, v, schedule: Phases, *, block_rows, block_k, cuts, sinks, seq_len,
               tiles_at_once=None):
    """Per phase (`schedule.phase_bounds`), the softmax statistics of each row over its phase's keys,
    cumulative over the phases: mean key, mean value (float32 [P, B, Hkv, N, D]) and lse
    (float32 [P, B, Hkv, N]). Same arguments as `attend`."""
    B, hkv, N, D = qf.shape
    scale, prec = softmax.scale2(D), softmax.precision(qf.dtype)
    P = len(cuts)

    def one(q, t, kk, vv, lo, hi):
        carry = softmax.init(block_rows, (D, D))
        snaps = []
        for p in range(P):
            lower, upper = phase_bounds(t[:, None], p, cuts, sinks, seq_len)

            def body(kb, carry, lower=lower, upper=upper):
                kt, vt = _key_block(kk, vv, kb, block_k)
                s = kb * block_k + jnp.arange(block_k)[None, :]
                return softmax.update(carry, softmax.logits(q, kt, scale, prec), (s > lower) & (s <= upper),
                                      (kt, vt), prec)

            carry = lax.fori_loop(lo[p], hi[p], body, carry)
            (mk, mv), lse2 = softmax.finish(carry)
            snaps.append((mk, mv, lse2 * softmax.LN2))
        return tuple(jnp.stack(x) for x in zip(*snaps))

    mk, mv, lse = _over_tiles(one, *_tiles(qf, pos, block_rows), k, v, (schedule.lo, schedule.hi), tiles_at_once)
    # [nq, B, Hkv, P, rows, ...] -> [P, B, Hkv, N, ...]
    mk, mv = (x.transpose(3, 1, 2, 0, 4, 5).reshape(P, B, hkv, N, D) for x in (mk, mv))
    return mk, mv, lse.transpose(3, 1, 2, 0, 4).reshape(P, B, hkv, N)

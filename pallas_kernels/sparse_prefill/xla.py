"""Blockwise pure-JAX path: a loop over query tiles, an online softmax over the scheduled key
blocks of each tile. Memory is O(tile * block_k), never [T, T]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .schedule import MASK_VALUE, Listed, Ranges, valid_mask


def attend(qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks):
    """Attention of folded query rows over scheduled key blocks.

    qf [B, Hkv, N, D] (N a multiple of block_rows), pos int32 [B, N] (the position of each row),
    k, v [B, Hkv, Tk, D] (Tk a multiple of block_k), schedule: Ranges or Listed per
    (batch, kv_head, tile). Returns out [B, Hkv, N, D] (qf dtype) and lse float32 [B, Hkv, N].
    """
    B, hkv, N, D = qf.shape
    nq = N // block_rows
    scale = D ** -0.5
    precision = lax.Precision.HIGHEST if qf.dtype == jnp.float32 else lax.Precision.DEFAULT
    q_tiles = qf.reshape(B, hkv, nq, block_rows, D).transpose(2, 0, 1, 3, 4)
    p_tiles = pos.reshape(B, nq, block_rows).transpose(1, 0, 2)
    if isinstance(schedule, Ranges):
        sched = (schedule.sink_blocks, schedule.lo, schedule.hi)
    else:
        sched = (schedule.indices, schedule.counts)
    sched = tuple(jnp.moveaxis(x, 2, 0) for x in sched)

    def one(q, t, kk, vv, *s):
        if isinstance(schedule, Ranges):
            sink_blocks, lo, hi = s
            count = sink_blocks + hi - lo
            block_at = lambda j: jnp.where(j < sink_blocks, j, lo + j - sink_blocks)
        else:
            indices, count = s
            block_at = lambda j: indices[j]

        def body(j, carry):
            m, l, acc = carry
            kb = block_at(j)
            kt = lax.dynamic_slice_in_dim(kk, kb * block_k, block_k)
            vt = lax.dynamic_slice_in_dim(vv, kb * block_k, block_k)
            sc = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * scale
            keep = valid_mask(t[:, None], kb * block_k + jnp.arange(block_k)[None, :], window, sinks)
            sc = jnp.where(keep, sc, MASK_VALUE)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.where(keep, jnp.exp(sc - m_new[:, None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[:, None] + lax.dot_general(
                p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((block_rows,), MASK_VALUE, jnp.float32),
                jnp.zeros((block_rows,), jnp.float32),
                jnp.zeros((block_rows, D), jnp.float32))
        m, l, acc = lax.fori_loop(0, count, body, init)
        empty = l == 0
        out = acc / jnp.where(empty, 1.0, l)[:, None]
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return out.astype(qf.dtype), lse

    per_head = jax.vmap(one, in_axes=(0, None, 0, 0) + (0,) * len(sched))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0) + (0,) * len(sched))
    out, lse = jax.vmap(per_batch, in_axes=(0, 0, None, None) + (0,) * len(sched))(q_tiles, p_tiles, k, v, *sched)
    out = out.transpose(1, 2, 0, 3, 4).reshape(B, hkv, N, D)
    lse = lse.transpose(1, 2, 0, 3).reshape(B, hkv, N)
    return out, lse

"""Pallas Mosaic TPU kernel: causal flash attention over scheduled key blocks.

Grid (batch, kv_head, query tile, step). The schedule (ranges or a block list per tile) is
scalar-prefetched into SMEM; the key/value index maps read it, so only the scheduled blocks are
copied in. Steps past a tile's count repeat its last block (no new copy) and skip the compute.
Queries are folded (`[B, Hkv, N, D]`: the rows of the `group` heads of one kv head) with a
position per row (`[B, N, 1]`); keys/values are `[B, Hkv, Tk, D]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .schedule import MASK_VALUE, Listed, Ranges, valid_mask


def _block(sched, flat, b, h, i, j, hkv, nq, steps):
    """Key block of step j of tile (b, h, i); past the count, the last scheduled block."""
    tile = (b * hkv + h) * nq + i
    if sched == "ranges":
        sink_ref, lo_ref, hi_ref = flat
        ns, lo = sink_ref[tile], lo_ref[tile]
        last = jnp.maximum(ns + hi_ref[tile] - lo - 1, 0)
        j = jnp.minimum(j, last)
        return jnp.where(j < ns, j, lo + j - ns)
    idx_ref, cnt_ref = flat
    j = jnp.minimum(j, jnp.maximum(cnt_ref[tile] - 1, 0))
    return idx_ref[tile * steps + j]


def _kernel(*refs, sched, n_flat, block_k, hkv, nq, steps, window, sinks, scale, precision):
    flat = refs[:n_flat]
    pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[n_flat:]
    b, h, i, j = (pl.program_id(a) for a in range(4))
    tile = (b * hkv + h) * nq + i
    if sched == "ranges":
        count = flat[0][tile] + flat[2][tile] - flat[1][tile]
    else:
        count = flat[1][tile]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        kb = _block(sched, flat, b, h, i, j, hkv, nq, steps)
        q = q_ref[...]
        k = k_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
        cols = kb * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        keep = valid_mask(pos_ref[...], cols, window, sinks)
        s = jnp.where(keep, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_scr[...] = l_scr[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        v = v_ref[...]
        acc_scr[...] = acc_scr[...] * corr + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(l_safe))


def attend(qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks, interpret=False):
    """Same contract as `xla.attend`: qf [B, Hkv, N, D], pos [B, N], k/v [B, Hkv, Tk, D].

    `interpret`: False, True (translated to `pltpu.InterpretParams()`) or InterpretParams.
    """
    B, hkv, n, D = qf.shape
    nq = n // block_rows
    steps = max(int(schedule.steps), 1)
    if isinstance(schedule, Ranges):
        sched = "ranges"
        flat = [x.reshape(-1).astype(jnp.int32) for x in (schedule.sink_blocks, schedule.lo, schedule.hi)]
    else:
        sched = "list"
        L = schedule.indices.shape[-1]
        idx = schedule.indices
        if L < steps:
            idx = jnp.pad(idx, ((0, 0),) * 3 + ((0, steps - L),))
        flat = [idx[..., :steps].reshape(-1).astype(jnp.int32),
                schedule.counts.reshape(-1).astype(jnp.int32)]
    block = functools.partial(_block, sched, hkv=hkv, nq=nq, steps=steps)

    def kv_map(b, h, i, j, *refs):
        return (b, h, block(refs, b, h, i, j), 0)

    precision = lax.Precision.HIGHEST if qf.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _kernel, sched=sched, n_flat=len(flat), block_k=block_k, hkv=hkv, nq=nq, steps=steps,
        window=window, sinks=sinks, scale=D ** -0.5, precision=precision)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(flat),
        grid=(B, hkv, nq, steps),
        in_specs=[
            pl.BlockSpec((None, block_rows, 1), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, None, block_rows, D), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_k, D), kv_map),
            pl.BlockSpec((None, None, block_k, D), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_rows, D), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_rows, 1), lambda b, h, i, j, *_: (b, h, i, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, D), jnp.float32)],
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct((B, hkv, n, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_prefill_tpu",
    )(*flat, pos[..., None], qf, k, v)
    return out, lse[..., 0]

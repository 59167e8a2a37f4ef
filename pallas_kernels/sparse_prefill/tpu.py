"""Pallas Mosaic TPU kernels: causal flash attention over scheduled key blocks, and the far-key
statistics of the `taylor` variant.

Grid (batch, kv_head, query tile, step). The schedule (ranges, a block list or phases per tile)
is scalar-prefetched into SMEM; the key/value index maps read it, so only the scheduled blocks are
copied in. Steps past a tile's count repeat its last block (no new copy) and skip the compute.
Queries are folded (`[B, Hkv, N, D]`: the rows of the `group` heads of one kv head) with a
position per row (`[B, N, 1]`); keys/values are `[B, Hkv, Tk, D]`. The online-softmax state
lives in VMEM scratch between steps (`pallas_kernels.softmax`, m and l as [rows, 1] columns).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import softmax

from .schedule import Phases, Ranges, phase_bounds, valid_mask


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


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def _load(m_scr, l_scr, acc_scrs):
    return softmax.Carry(m_scr[...], l_scr[...], tuple(a[...] for a in acc_scrs))


def _store(carry, m_scr, l_scr, acc_scrs):
    m_scr[...] = carry.m
    l_scr[...] = carry.l
    for a, x in zip(acc_scrs, carry.accs):
        a[...] = x


def _reset(m_scr, l_scr, acc_scrs):
    _store(softmax.init(m_scr.shape[0], [a.shape[1] for a in acc_scrs], column=True), m_scr, l_scr, acc_scrs)


def _kernel(*refs, sched, n_flat, block_k, hkv, nq, steps, window, sinks, gamma, scale, prec):
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
        _reset(m_scr, l_scr, (acc_scr,))

    @pl.when(j < count)
    def _step():
        kb = _block(sched, flat, b, h, i, j, hkv, nq, steps)
        s = softmax.logits(q_ref[...], k_ref[...], scale, prec)
        cols = kb * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        keep = valid_mask(pos_ref[...], cols, window, sinks, gamma)
        _store(softmax.update(_load(m_scr, l_scr, (acc_scr,)), s, keep, (v_ref[...],), prec),
               m_scr, l_scr, (acc_scr,))

    @pl.when(j == steps - 1)
    def _finish():
        (o,), lse2 = softmax.finish(_load(m_scr, l_scr, (acc_scr,)))
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse2 * softmax.LN2


def attend(qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks, gamma=None, interpret=False):
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

    kernel = functools.partial(
        _kernel, sched=sched, n_flat=len(flat), block_k=block_k, hkv=hkv, nq=nq, steps=steps,
        window=window, sinks=sinks, gamma=gamma, scale=softmax.scale2(D), prec=softmax.precision(qf.dtype))
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
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct((B, hkv, n, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="sparse_prefill_tpu",
    )(*flat, pos[..., None], qf, k, v)
    return out, lse[..., 0]


def _phase_step(lo_ref, hi_ref, tile, j, P):
    """(phase, key block) of step j: the phases' block ranges laid end to end; past the last,
    the last block of the last non-empty phase."""
    phase, block, start = jnp.int32(0), jnp.int32(0), jnp.int32(0)
    for p in range(P):
        lo, hi = lo_ref[tile * P + p], hi_ref[tile * P + p]
        inside = (j >= start) & (j < start + hi - lo)
        phase = jnp.where(inside, p, phase)
        past = (j >= start + hi - lo) & (hi > lo)
        block = jnp.where(inside, lo + j - start, jnp.where(past, hi - 1, block))
        start = start + hi - lo
    return phase, block, start


def _far_kernel(lo_ref, hi_ref, pos_ref, q_ref, k_ref, v_ref, *refs, block_k, hkv, nq, steps, cuts, sinks,
                seq_len, scale, prec):
    P = len(cuts)
    outs, (m_scr, l_scr, mk_scr, mv_scr) = refs[:3 * P], refs[3 * P:]
    b, h, i, j = (pl.program_id(a) for a in range(4))
    tile = (b * hkv + h) * nq + i
    phase, kb, _ = _phase_step(lo_ref, hi_ref, tile, j, P)
    accs = (mk_scr, mv_scr)

    @pl.when(j == 0)
    def _init():
        _reset(m_scr, l_scr, accs)

    end = jnp.int32(0)
    for p in range(P):
        end = end + hi_ref[tile * P + p] - lo_ref[tile * P + p]

        @pl.when((j < end) & (phase == p))
        def _step(p=p):
            k, v = k_ref[...], v_ref[...]
            s = softmax.logits(q_ref[...], k, scale, prec)
            cols = kb * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            lower, upper = phase_bounds(pos_ref[...], p, cuts, sinks, seq_len)
            _store(softmax.update(_load(m_scr, l_scr, accs), s, (cols > lower) & (cols <= upper), (k, v), prec),
                   m_scr, l_scr, accs)

        @pl.when(j == jnp.maximum(end - 1, 0))
        def _snapshot(p=p):
            (mk, mv), lse2 = softmax.finish(_load(m_scr, l_scr, accs))
            outs[3 * p][...] = mk
            outs[3 * p + 1][...] = mv
            outs[3 * p + 2][...] = lse2 * softmax.LN2


def far_phases(qf, pos, k, v, schedule: Phases, *, block_rows, block_k, cuts, sinks, seq_len, interpret=False):
    """Same contract as `xla.far_phases` (k/v [B, Hkv, Tk, D])."""
    B, hkv, n, D = qf.shape
    nq = n // block_rows
    P = len(cuts)
    steps = max(int(schedule.steps), 1)
    lo, hi = (x.reshape(-1).astype(jnp.int32) for x in (schedule.lo, schedule.hi))

    def kv_map(b, h, i, j, lo_ref, hi_ref):
        return (b, h, _phase_step(lo_ref, hi_ref, (b * hkv + h) * nq + i, j, P)[1], 0)

    row_spec = pl.BlockSpec((None, None, block_rows, D), lambda b, h, i, j, *_: (b, h, i, 0))
    lse_spec = pl.BlockSpec((None, None, block_rows, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    kernel = functools.partial(
        _far_kernel, block_k=block_k, hkv=hkv, nq=nq, steps=steps, cuts=tuple(cuts), sinks=sinks,
        seq_len=seq_len, scale=softmax.scale2(D), prec=softmax.precision(qf.dtype))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, hkv, nq, steps),
        in_specs=[
            pl.BlockSpec((None, block_rows, 1), lambda b, h, i, j, *_: (b, i, 0)),
            row_spec,
            pl.BlockSpec((None, None, block_k, D), kv_map),
            pl.BlockSpec((None, None, block_k, D), kv_map),
        ],
        out_specs=[row_spec, row_spec, lse_spec] * P,
        scratch_shapes=[pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, D), jnp.float32),
                        pltpu.VMEM((block_rows, D), jnp.float32)],
    )
    stats = [jax.ShapeDtypeStruct((B, hkv, n, D), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, hkv, n, 1), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=stats * P,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="sparse_prefill_far_tpu",
    )(lo, hi, pos[..., None], qf, k, v)
    return (jnp.stack(outs[0::3]), jnp.stack(outs[1::3]), jnp.stack(outs[2::3])[..., 0])

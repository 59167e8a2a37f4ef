"""Pallas Triton (GPU) kernel: causal flash attention over a block-sparse set of key blocks.

One program per (query tile, batch, head), the last (heaviest causal) tiles launched first. The key blocks come either from ranges computed in
the kernel from the tile's positions (sink blocks, then the window band, split into masked edge
blocks and an unmasked interior) or from a list read inside the kernel (block-sparse form).
Queries come either in place (`[B, T, H, D]`, contiguous positions) or folded: gathered rows of
the `group` heads of one kv head stacked as `[B, Hkv, N, D]` with a position per row, so one
program loads each key block once for the whole group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import softmax

from .schedule import FAR, block_start, div, phase_bounds, valid_mask


def _kernel(*refs, folded, listed, num_tiles, block_k, num_k_blocks, window, sinks, gamma, scale, prec,
            fold=1, one_loop=False):
    refs = list(refs)
    pos_ref = refs.pop(0) if folded else None
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    if listed:
        idx_ref, cnt_ref = refs[:2]
        refs = refs[2:]
    o_ref, lse_ref = refs

    positions, width = q_ref.shape
    d = width // fold
    bq = positions * fold
    q = q_ref[...]
    if fold > 1:
        q = q.reshape(bq, d)
    if folded:
        t = pos_ref[...]
        tmin, tmax = jnp.min(t), jnp.max(t)
    else:
        tmin = (num_tiles - 1 - pl.program_id(0)) * positions
        t = tmin + div(jnp.arange(bq, dtype=jnp.int32), fold)
        tmax = tmin + (positions - 1)

    def step(kb, carry, masked):
        ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        keep = None
        if masked:
            keep = valid_mask(t[:, None], kb * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :],
                              window, sinks, gamma)
        s = softmax.logits(q, k_ref[ks, :], scale, prec)
        return softmax.update(carry, s, keep, (v_ref[ks, :],), prec)

    carry = softmax.init(bq, (d,))
    if listed:
        carry = lax.fori_loop(0, cnt_ref[0], lambda j, c: step(idx_ref[j], c, True), carry)
    else:
        hi = jnp.minimum(div(tmax, block_k) + 1, num_k_blocks)
        if window >= FAR:
            lo = jnp.int32(0)
            inner_lo = jnp.int32(0)
        else:
            start_min, start_max = block_start(tmin, gamma), block_start(tmax, gamma)
            lo = jnp.minimum(div(jnp.maximum(start_min - window + 1, 0), block_k), hi)
            inner_lo = jnp.minimum(div(jnp.maximum(start_max - window + 1, 0) + block_k - 1, block_k), hi)
        inner_lo = jnp.maximum(inner_lo, lo)
        inner_hi = jnp.minimum(jnp.maximum(div(tmin + 1, block_k), inner_lo), hi)
        # blocks before lo are causal and outside every row's window: only `s < sinks` matters
        sink_hi = jnp.minimum(-(-sinks // block_k), lo) if sinks and window < FAR else jnp.int32(0)
        if one_loop:  # sinks, band edges and interior in one loop, every block masked
            carry = lax.fori_loop(0, sink_hi + hi - lo, lambda j, c: step(
                jnp.where(j < sink_hi, j, lo + j - sink_hi), c, masked=True), carry)
        else:
            if sinks and window < FAR:
                carry = lax.fori_loop(0, sink_hi, functools.partial(step, masked=sinks % block_k != 0), carry)
            carry = lax.fori_loop(lo, inner_lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(inner_lo, inner_hi, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(inner_hi, hi, functools.partial(step, masked=True), carry)
    (o,), lse2 = softmax.finish(carry)
    o = o.astype(o_ref.dtype)
    lse = lse2 * softmax.LN2
    o_ref[...] = o.reshape(positions, width) if fold > 1 else o
    lse_ref[...] = lse.reshape(positions, fold) if fold > 1 else lse


def _far_kernel(pos_ref, q_ref, k_ref, v_ref, *out_refs, block_k, num_k_blocks, cuts, sinks, seq_len, scale,
                prec):
    """Cumulative far-key statistics of gathered rows, one output triple (mean key, mean value, lse)
    per phase; phase 0 walks its unmasked interior blocks without a mask."""
    t = pos_ref[...]
    tmin, tmax = jnp.min(t), jnp.max(t)
    q = q_ref[...]
    rows, d = q.shape
    cols = jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def step(kb, carry, bounds):
        ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        keep = None
        if bounds is not None:
            s = kb * block_k + cols
            keep = (s > bounds[0]) & (s <= bounds[1])
        return softmax.update(carry, softmax.logits(q, k, scale, prec), keep, (k, v), prec)

    carry = softmax.init(rows, (d, d))
    for p in range(len(cuts)):
        bounds = phase_bounds(t[:, None], p, cuts, sinks, seq_len)
        masked = functools.partial(step, bounds=bounds)
        lower = phase_bounds(tmin, p, cuts, sinks, seq_len)[0]
        upper_min = phase_bounds(tmin, p, cuts, sinks, seq_len)[1]
        upper = phase_bounds(tmax, p, cuts, sinks, seq_len)[1]
        lo = jnp.clip(div(jnp.maximum(lower + 1, 0), block_k), 0, num_k_blocks)
        hi = jnp.where(upper > lower, jnp.minimum(div(jnp.maximum(upper, 0), block_k) + 1, num_k_blocks), lo)
        if p == 0:  # every row starts at the sinks: blocks inside [sinks, min upper] need no mask
            inner_lo = jnp.minimum(div(jnp.maximum(lower + block_k, 0), block_k), hi)
            inner_hi = jnp.clip(div(jnp.maximum(upper_min + 1, 0), block_k), inner_lo, hi)
            carry = lax.fori_loop(lo, inner_lo, masked, carry)
            carry = lax.fori_loop(inner_lo, inner_hi, functools.partial(step, bounds=None), carry)
            carry = lax.fori_loop(inner_hi, hi, masked, carry)
        else:
            carry = lax.fori_loop(lo, hi, masked, carry)
        (mk, mv), lse2 = softmax.finish(carry)
        mk_ref, mv_ref, lse_ref = out_refs[3 * p:3 * p + 3]
        mk_ref[...] = mk
        mv_ref[...] = mv
        lse_ref[...] = lse2 * softmax.LN2


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def attend_direct(q, k, v, *, block_q, block_k, window, sinks, gamma=None, indices=None, counts=None,
                  num_warps=4, num_stages=2, one_loop=False, interpret=False):
    """Every row in place. q [B, Tq, H, D] (Tq a multiple of block_q), k/v [B, Tk, Hkv, D]
    (Tk a multiple of block_k). Optional `indices` [B, Hkv, nQ, L] / `counts` [B, Hkv, nQ]:
    the key blocks of each query tile (else the window/sinks ranges). Returns out, lse [B, H, Tq]."""
    B, tq, H, D = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = H // hkv
    nq = tq // block_q
    listed = indices is not None
    kernel = functools.partial(
        _kernel, folded=False, listed=listed, num_tiles=nq, block_k=block_k, num_k_blocks=tk // block_k,
        window=window, sinks=sinks, gamma=gamma, scale=softmax.scale2(D), prec=softmax.precision(q.dtype),
        one_loop=one_loop)
    in_specs = [
        pl.BlockSpec((None, block_q, None, D), lambda i, b, h: (b, nq - 1 - i, h, 0)),
        pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h // group, 0)),
    ]
    args = [q, k, v]
    if listed:
        L = indices.shape[-1]
        in_specs += [pl.BlockSpec((None, None, None, L), lambda i, b, h: (b, h // group, nq - 1 - i, 0)),
                     pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h // group, nq - 1 - i))]
        args += [indices, counts]
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, block_q, None, D), lambda i, b, h: (b, nq - 1 - i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, nq - 1 - i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, tq), jnp.float32)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_prefill_direct",
    )(*args)
    return out, lse


def attend_grouped(q, k, v, *, block_q, block_k, window, sinks, gamma=None, num_warps=4, num_stages=2,
                   one_loop=False, interpret=False):
    """Every row in place, the `group` heads of a kv head in one tile of block_q rows
    (block_q / group positions), so each key block is loaded once per group and the band is
    narrower. q [B, Tq, H, D] (Tq a multiple of block_q / group), k/v [B, Tk, Hkv, D]; group a
    power of two dividing block_q. Returns out [B, Tq, H, D], lse [B, H, Tq]."""
    B, tq, H, D = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = H // hkv
    positions = block_q // group
    nq = tq // positions
    kernel = functools.partial(
        _kernel, folded=False, listed=False, num_tiles=nq, block_k=block_k, num_k_blocks=tk // block_k,
        window=window, sinks=sinks, gamma=gamma, scale=softmax.scale2(D), prec=softmax.precision(q.dtype),
        fold=group, one_loop=one_loop)
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, B, hkv),
        in_specs=[
            pl.BlockSpec((None, positions, None, group * D), lambda i, b, h: (b, nq - 1 - i, h, 0)),
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=[pl.BlockSpec((None, positions, None, group * D), lambda i, b, h: (b, nq - 1 - i, h, 0)),
                   pl.BlockSpec((None, positions, None, group), lambda i, b, h: (b, nq - 1 - i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, tq, hkv, group * D), q.dtype),
                   jax.ShapeDtypeStruct((B, tq, hkv, group), jnp.float32)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_prefill_grouped",
    )(q.reshape(B, tq, hkv, group * D), k, v)
    return out.reshape(B, tq, H, D), lse.reshape(B, tq, H).transpose(0, 2, 1)


def attend_folded(qf, pos, k, v, *, block_rows, block_k, window, sinks, num_warps=4, num_stages=2,
                  interpret=False):
    """Gathered rows, heads of a group folded. qf [B, Hkv, N, D] (N a multiple of block_rows),
    pos int32 [B, N], k/v [B, Tk, Hkv, D]. Returns out [B, Hkv, N, D], lse [B, Hkv, N]."""
    B, hkv, n, D = qf.shape
    tk = k.shape[1]
    nq = n // block_rows
    kernel = functools.partial(
        _kernel, folded=True, listed=False, num_tiles=nq, block_k=block_k, num_k_blocks=tk // block_k,
        window=window, sinks=sinks, gamma=None, scale=softmax.scale2(D), prec=softmax.precision(qf.dtype))
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, B, hkv),
        in_specs=[
            pl.BlockSpec((None, block_rows), lambda i, b, h: (b, nq - 1 - i)),
            pl.BlockSpec((None, None, block_rows, D), lambda i, b, h: (b, h, nq - 1 - i, 0)),
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, block_rows, D), lambda i, b, h: (b, h, nq - 1 - i, 0)),
                   pl.BlockSpec((None, None, block_rows), lambda i, b, h: (b, h, nq - 1 - i))],
        out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct((B, hkv, n), jnp.float32)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_prefill_rows",
    )(pos, qf, k, v)
    return out, lse


def far_phases(qf, pos, k, v, *, block_rows, block_k, cuts, sinks, seq_len, num_warps=4, num_stages=2,
               interpret=False):
    """Gathered rows, heads of a group folded: per phase (`schedule.phase_bounds`) the cumulative
    mean key, mean value and lse of each row's far keys. qf [B, Hkv, N, D] (N a multiple of
    block_rows), pos int32 [B, N], k/v [B, Tk, Hkv, D]. Returns float32 [P, B, Hkv, N, D] twice and
    [P, B, Hkv, N]."""
    B, hkv, n, D = qf.shape
    tk = k.shape[1]
    nq = n // block_rows
    P = len(cuts)
    kernel = functools.partial(
        _far_kernel, block_k=block_k, num_k_blocks=tk // block_k, cuts=tuple(cuts), sinks=sinks,
        seq_len=seq_len, scale=softmax.scale2(D), prec=softmax.precision(qf.dtype))
    row_spec = pl.BlockSpec((None, None, block_rows, D), lambda i, b, h: (b, h, nq - 1 - i, 0))
    lse_spec = pl.BlockSpec((None, None, block_rows), lambda i, b, h: (b, h, nq - 1 - i))
    stats = [jax.ShapeDtypeStruct((B, hkv, n, D), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, hkv, n), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid=(nq, B, hkv),
        in_specs=[
            pl.BlockSpec((None, block_rows), lambda i, b, h: (b, nq - 1 - i)),
            row_spec,
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, tk, None, D), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=[row_spec, row_spec, lse_spec] * P,
        out_shape=stats * P,
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_prefill_far",
    )(pos, qf, k, v)
    return (jnp.stack(outs[0::3]), jnp.stack(outs[1::3]), jnp.stack(outs[2::3]))

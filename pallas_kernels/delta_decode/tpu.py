"""Pallas Mosaic TPU kernels for DELTA decode over a paged KV cache.

Grid (batch, kv head, step) with the step axis sequential ("arbitrary") and the online-softmax
state in VMEM scratch; the `group` query heads of a kv head share the program (q tile
[group, head_dim]). The lengths, the page table (and the selection) are prefetched into SMEM
(`PrefetchScalarGridSpec`); the pool is passed `pages_per_block` times, once per page of a step,
each with an index map that looks its physical page up in the table, so the pipeline copies
exactly the pages a step needs:

- `dense`: step j covers logical pages [j * pages_per_block, (j + 1) * pages_per_block); steps
  past the length repeat the last valid block's pages (no new copy) and skip the compute. With
  `logits` it also writes the base-2 scaled logits.
- `sparse`: step j covers the selection entries [j * pages_per_block, (j + 1) * pages_per_block)
  (logical pages mapped through the table; -1: not read); invalid pages and tokens past the
  length are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import softmax

from .common import precision, scale2 as _scale2



def _interpret(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def _step(q, k, v, keep, m_scr, l_scr, acc_scr, scale2, prec):
    """One online-softmax step on the scratch state; returns the scaled logits."""
    s = softmax.logits(q, k, scale2, prec)
    m, l, (acc,) = softmax.update(softmax.Carry(m_scr[...], l_scr[...], (acc_scr[...],)), s, keep, (v,), prec)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc
    return s


def _init(m_scr, l_scr, acc_scr):
    m, l, (acc,) = softmax.init(m_scr.shape[0], (acc_scr.shape[1],), column=True)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc


def _finish(o_ref, m_scr, l_scr, acc_scr, lse_ref=None):
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log2(l_safe))


def _tile(refs):
    """One [pages * page_size, head_dim] tile from the per-page refs."""
    return refs[0][...] if len(refs) == 1 else jnp.concatenate([r[...] for r in refs], axis=0)


def _dense_kernel(len_ref, table_ref, q_ref, *refs, pages_per_block, logits, scale2, prec):
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
    o_ref, lse_ref, *s_ref = refs[2 * pages_per_block:len(refs) - 3]
    m_scr, l_scr, acc_scr = refs[len(refs) - 3:]
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    block_k = pages_per_block * k_refs[0].shape[0]

    @pl.when(j == 0)
    def _():
        _init(m_scr, l_scr, acc_scr)

    @pl.when(j * block_k < length)
    def _():
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], block_k), 1)
        s = _step(q_ref[...], _tile(k_refs), _tile(v_refs), cols < length, m_scr, l_scr, acc_scr, scale2, prec)
        if logits:
            s_ref[0][...] = s

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        _finish(o_ref, m_scr, l_scr, acc_scr, lse_ref)


def _sparse_kernel(len_ref, table_ref, sel_ref, q_ref, *refs, pages_per_block, scale2, prec):
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
    o_ref, m_scr, l_scr, acc_scr = refs[2 * pages_per_block:]
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    page_size = k_refs[0].shape[0]
    base = (b * pl.num_programs(2) + j) * pages_per_block
    sel = [sel_ref[base + i] for i in range(pages_per_block)]
    read = [(x >= 0) & (x * page_size < length) for x in sel]

    @pl.when(j == 0)
    def _():
        _init(m_scr, l_scr, acc_scr)

    @pl.when(functools.reduce(jnp.logical_or, read))
    def _():
        shape = (q_ref.shape[0], pages_per_block * page_size)
        cols = lax.broadcasted_iota(jnp.int32, shape, 1)
        logical = jnp.full(shape, -1, jnp.int32)
        for i, x in enumerate(sel):
            logical = jnp.where(cols // page_size == i, x, logical)
        keep = (logical >= 0) & (logical * page_size + cols % page_size < length)
        _step(q_ref[...], _tile(k_refs), _tile(v_refs), keep, m_scr, l_scr, acc_scr, scale2, prec)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        _finish(o_ref, m_scr, l_scr, acc_scr)


def _scratch(G, D):
    return [pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
            pltpu.VMEM((G, D), jnp.float32)]


def _page_specs(pages, pages_per_block, physical):
    """pages_per_block BlockSpecs of one [page_size, head_dim] page each of the pool [Hkv, P,
    page_size, D]; `physical(b, j, i, *prefetch)` is the physical page of block slot i at step j."""
    _, _, page_size, D = pages.shape
    return [pl.BlockSpec((None, None, page_size, D),
                         lambda b, h, j, *pre, i=i: (h, physical(b, j, i, *pre), 0, 0))
            for i in range(pages_per_block)]


def _flat_table(page_table, pages_per_block):
    """[B, pages_per_seq] -> flat int32 [B * padded], rows padded with page 0 to a multiple of
    pages_per_block (SMEM holds 1-D arrays without padding)."""
    B, pps = page_table.shape
    padded = pl.cdiv(pps, pages_per_block) * pages_per_block
    return jnp.pad(page_table, ((0, 0), (0, padded - pps))).reshape(-1), padded


def dense(q, k_pages, v_pages, page_table, lengths, *, pages_per_block, logits=True, interpret=False):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table int32 [B, pages_per_seq]
    (in range), lengths int32 [B] (<= pages_per_seq * page_size) -> out [B, Hkv, G, D],
    lse2 [B, Hkv, G] and, with `logits`, logits2 [B, Hkv, G, pages_per_seq * page_size] (tokens
    >= length unwritten), else None. Steps past the length repeat the last block's indices (no
    copy) and skip the compute."""
    B, hkv, G, D = q.shape
    page_size = k_pages.shape[2]
    pps = page_table.shape[1]
    table, padded = _flat_table(page_table, pages_per_block)
    block_k = pages_per_block * page_size

    def last(b, j, len_ref):
        return jnp.minimum(j, jnp.maximum(pl.cdiv(len_ref[b], block_k) - 1, 0))

    def physical(b, j, i, len_ref, table_ref):
        return table_ref[b * padded + last(b, j, len_ref) * pages_per_block + i]

    out_specs = [pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0)),
                 pl.BlockSpec((None, None, G, 1), lambda b, h, j, *_: (b, h, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, hkv, G, 1), jnp.float32)]
    if logits:
        out_specs.append(pl.BlockSpec((None, None, G, block_k),
                                      lambda b, h, j, len_ref, _: (b, h, 0, last(b, j, len_ref))))
        out_shape.append(jax.ShapeDtypeStruct((B, hkv, G, padded * page_size), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, hkv, padded // pages_per_block),
        in_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0))]
        + _page_specs(k_pages, pages_per_block, physical) + _page_specs(v_pages, pages_per_block, physical),
        out_specs=out_specs,
        scratch_shapes=_scratch(G, D),
    )
    kernel = functools.partial(_dense_kernel, pages_per_block=pages_per_block, logits=logits,
                               scale2=_scale2(D), prec=precision(q.dtype))
    out, lse2, *s2 = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="delta_paged_decode_tpu" + ("_logits" if logits else ""),
    )(lengths, table, q, *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))
    return out, lse2[..., 0], (s2[0][..., :pps * page_size] if logits else None)


def sparse(q, k_pages, v_pages, page_table, sel, lengths, *, pages_per_block, interpret=False):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table int32 [B, pages_per_seq]
    (in range), sel int32 [B, n] logical pages in range or -1 (not read), n % pages_per_block ==
    0, lengths int32 [B] -> out [B, Hkv, G, D]. Blocks with no page to read skip the compute."""
    B, hkv, G, D = q.shape
    n = sel.shape[1]
    table, padded = _flat_table(page_table, pages_per_block)

    def physical(b, j, i, len_ref, table_ref, sel_ref):
        return table_ref[b * padded + jnp.maximum(sel_ref[b * n + j * pages_per_block + i], 0)]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, hkv, n // pages_per_block),
        in_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0))]
        + _page_specs(k_pages, pages_per_block, physical) + _page_specs(v_pages, pages_per_block, physical),
        out_specs=pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0)),
        scratch_shapes=_scratch(G, D),
    )
    kernel = functools.partial(_sparse_kernel, pages_per_block=pages_per_block, scale2=_scale2(D),
                               prec=precision(q.dtype))
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="delta_paged_sparse_decode_tpu",
    )(lengths, table, sel.reshape(-1), q, *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))

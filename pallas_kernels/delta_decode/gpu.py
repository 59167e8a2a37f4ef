"""Pallas Triton (GPU) kernels for DELTA decode over a paged KV cache, flash-decoding style.

Both kernels run one program per (batch, kv head, split); the `group` query heads of the kv
head share the program (q tile [Gp, head_dim], Gp = group padded to a power of two >= 16 for
the tensor cores). A program sees the kv head's whole page pool [num_pages, page_size, head_dim]
and its sequence's page-table row, and gathers `pages_per_block` physical pages per step as one
[pages_per_block * page_size, head_dim] tile. Each program writes unnormalized partial results
(o, m2, l) that a second small kernel (or `common.combine`) merges across splits.

- `dense`: split j takes the blocks j, j + num_splits, j + 2 * num_splits, ... of the logical
  pages below the sequence length (interleaved: the work spreads evenly over the splits whatever
  the length; no work past it, none for an empty slot); with `logits` it also stores the base-2
  scaled logits of the real query heads (the page scores are computed from them once the final
  lse is known).
- `sparse`: a split is a run of the page selection (logical pages, -1: not read), mapped
  through the page table inside the kernel.

Tiles are chosen so that `smem_bytes` fits `SMEM_BYTES`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import softmax

from .common import combine, precision, scale2 as _scale2



SMEM_BYTES = 224 * 1024  # Hopper: 227 KiB of shared memory per block


def padded_group(group: int) -> int:
    return max(16, pl.next_power_of_2(group))


def smem_bytes(rows: int, group: int, head_dim: int, itemsize: int, num_stages: int) -> int:
    """Shared memory of one `dense` or `sparse` program with [rows, head_dim] k and v tiles of
    `itemsize` bytes: num_stages pipelined copies of k and v, the q tile [Gp, head_dim], the
    probabilities [Gp, rows] as a dot operand and the float32 accumulator [Gp, head_dim] (an upper
    bound: Triton may keep the last two in registers)."""
    gp = padded_group(group)
    return (2 * num_stages * rows * head_dim * itemsize + gp * head_dim * itemsize + gp * rows * itemsize
            + gp * head_dim * 4)


def combine_smem_bytes(num_splits: int, group: int, head_dim: int) -> int:
    """Shared memory of one combine program: the float32 partial outputs [num_splits, group,
    head_dim] and their weights (an upper bound)."""
    return num_splits * group * (head_dim + 2) * 4


def _update(q, k, v, keep, carry, scale2, prec):
    """One online-softmax step; returns the new carry and the scaled logits."""
    s = softmax.logits(q, k, scale2, prec)
    return softmax.update(carry, s, keep, (v,), prec), s


def _init(gp, d):
    return softmax.init(gp, (d,))


def _store_partials(o_ref, m_ref, l_ref, carry):
    m, l, (acc,) = carry
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _dense_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *s_ref,
                  pages_per_block, group, scale2, prec):
    length = len_ref[0]
    num_pages = table_ref.shape[0]
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    split, num_splits = pl.program_id(2), pl.num_programs(2)
    blocks = pl.cdiv(pl.cdiv(length, page_size), pages_per_block)  # blocks with tokens < length
    steps = jnp.maximum(pl.cdiv(blocks - split, num_splits), 0)
    q = q_ref[...]
    gp, d = q.shape
    pages = lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    rows = lax.broadcasted_iota(jnp.int32, (gp, block_k), 0) < group
    cols = lax.broadcasted_iota(jnp.int32, (gp, block_k), 1)

    def body(i, carry):
        start = pl.multiple_of((split + i * num_splits) * pages_per_block, pages_per_block)
        ids = plgpu.load(table_ref.at[pl.ds(start, pages_per_block)], mask=start + pages < num_pages,
                         other=0)
        keep = start * page_size + cols < length
        carry, s = _update(q, k_ref[ids].reshape(block_k, d), v_ref[ids].reshape(block_k, d), keep,
                           carry, scale2, prec)
        if s_ref:
            plgpu.store(s_ref[0].at[:, pl.ds(pl.multiple_of(start * page_size, block_k), block_k)], s,
                        mask=rows & keep)
        return carry

    _store_partials(o_ref, m_ref, l_ref, lax.fori_loop(0, steps, body, _init(gp, d)))


def _sparse_kernel(len_ref, table_ref, sel_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   pages_per_block, steps, scale2, prec):
    length = len_ref[0]
    q = q_ref[...]
    gp, d = q.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    offs = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)

    def body(i, carry):
        sel = sel_ref[pl.ds(pl.multiple_of(i * pages_per_block, pages_per_block), pages_per_block)]
        logical = jnp.maximum(sel, 0)
        ids = table_ref[logical]
        keep = ((logical[:, None] * page_size + offs < length) & (sel >= 0)[:, None]).reshape(1, block_k)
        carry, _ = _update(q, k_ref[ids].reshape(block_k, d), v_ref[ids].reshape(block_k, d), keep,
                           carry, scale2, prec)
        return carry

    _store_partials(o_ref, m_ref, l_ref,
                    lax.fori_loop(jnp.int32(0), jnp.where(length > 0, jnp.int32(steps), jnp.int32(0)), body,
                                  _init(gp, d)))


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, lse_ref):
    """Merges the splits of one (batch, kv head): o [n, Gp, D], m2 / l [n, Gp] -> [G, D], [G]."""
    G = out_ref.shape[0]
    o = o_ref[:, pl.ds(0, G), :]
    m2 = m_ref[:, pl.ds(0, G)]
    l = l_ref[:, pl.ds(0, G)]
    m = jnp.max(m2, axis=0)
    w = jnp.exp2(m2 - m[None, :])
    l_tot = jnp.sum(l * w, axis=0)
    acc = jnp.sum(o * w[:, :, None], axis=0)
    empty = l_tot == 0.0
    l_safe = jnp.where(empty, 1.0, l_tot)
    out_ref[...] = (acc / l_safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def _pad_group(q):
    B, hkv, G, D = q.shape
    gp = padded_group(G)
    return jnp.pad(q, ((0, 0), (0, 0), (0, gp - G), (0, 0))), gp


def _pool_spec(pages):
    """The kv head's whole pool [num_pages, page_size, head_dim]; the kernels gather from it."""
    _, P, page_size, D = pages.shape
    return pl.BlockSpec((None, P, page_size, D), lambda b, h, j: (h, 0, 0, 0))


def _partial_shapes(B, hkv, splits, gp, D):
    return [jax.ShapeDtypeStruct((B, hkv, splits, gp, D), jnp.float32),
            jax.ShapeDtypeStruct((B, hkv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((B, hkv, splits, gp), jnp.float32)]


def _partial_specs(gp, D):
    return [pl.BlockSpec((None, None, None, gp, D), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, j: (b, h, j, 0))]


def _finish(o, m2, l, G, dtype, in_kernel, interpret):
    """Split partials -> out [B, Hkv, G, D] in dtype, lse2 [B, Hkv, G]: one small Pallas launch
    when the tiles are powers of two and fit shared memory (in_kernel), else XLA."""
    B, hkv, n, gp, D = o.shape
    if not (in_kernel and pl.next_power_of_2(G) == G and pl.next_power_of_2(n) == n
            and combine_smem_bytes(n, G, D) <= SMEM_BYTES):
        out, lse2 = combine(o[..., :G, :], m2[..., :G], l[..., :G])
        return out.astype(dtype), lse2
    return pl.pallas_call(
        _combine_kernel,
        grid=(B, hkv),
        in_specs=[pl.BlockSpec((None, None, n, gp, D), lambda b, h: (b, h, 0, 0, 0)),
                  pl.BlockSpec((None, None, n, gp), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, n, gp), lambda b, h: (b, h, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, G, D), lambda b, h: (b, h, 0, 0)),
                   pl.BlockSpec((None, None, G), lambda b, h: (b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, hkv, G, D), dtype),
                   jax.ShapeDtypeStruct((B, hkv, G), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="delta_decode_combine",
    )(o, m2, l)


def dense(q, k_pages, v_pages, page_table, lengths, *, pages_per_block, num_splits, num_warps,
          num_stages, combine_in_kernel=True, logits=True, interpret=False):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table int32 [B, pages_per_seq]
    (in range), lengths int32 [B] (<= pages_per_seq * page_size).

    Returns out [B, Hkv, G, D], lse2 [B, Hkv, G] and, with `logits`, logits2 [B, Hkv, G,
    pages_per_seq * page_size] (tokens >= length unwritten), else None."""
    B, hkv, G, D = q.shape
    page_size = k_pages.shape[2]
    pps = page_table.shape[1]
    qp, gp = _pad_group(q)
    kernel = functools.partial(_dense_kernel, pages_per_block=pages_per_block, group=G, scale2=_scale2(D),
                               prec=precision(q.dtype))
    out_specs, out_shape = _partial_specs(gp, D), _partial_shapes(B, hkv, num_splits, gp, D)
    if logits:
        out_specs.append(pl.BlockSpec((None, None, gp, pps * page_size), lambda b, h, j: (b, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, hkv, G, pps * page_size), jnp.float32))
    o, m2, l, *s2 = pl.pallas_call(
        kernel,
        grid=(B, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, pps), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, None, gp, D), lambda b, h, j: (b, h, 0, 0)),
                  _pool_spec(k_pages), _pool_spec(v_pages)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="delta_paged_decode" + ("_logits" if logits else ""),
    )(lengths.reshape(B, 1), page_table, qp, k_pages, v_pages)
    out, lse2 = _finish(o, m2, l, G, q.dtype, combine_in_kernel, interpret)
    return out, lse2, (s2[0] if logits else None)


def sparse(q, k_pages, v_pages, page_table, sel, lengths, *, pages_per_block, num_splits, num_warps,
           num_stages, combine_in_kernel=True, interpret=False):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table int32 [B, pages_per_seq]
    (in range), sel int32 [B, n] logical pages in range or -1 (not read), n % (num_splits *
    pages_per_block) == 0, lengths int32 [B] -> out [B, Hkv, G, D]."""
    B, hkv, G, D = q.shape
    pps = page_table.shape[1]
    per_split = sel.shape[1] // num_splits
    qp, gp = _pad_group(q)
    kernel = functools.partial(_sparse_kernel, pages_per_block=pages_per_block,
                               steps=per_split // pages_per_block, scale2=_scale2(D),
                               prec=precision(q.dtype))
    o, m2, l = pl.pallas_call(
        kernel,
        grid=(B, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, pps), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, None, per_split), lambda b, h, j: (b, j, 0)),
                  pl.BlockSpec((None, None, gp, D), lambda b, h, j: (b, h, 0, 0)),
                  _pool_spec(k_pages), _pool_spec(v_pages)],
        out_specs=_partial_specs(gp, D),
        out_shape=_partial_shapes(B, hkv, num_splits, gp, D),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="delta_paged_sparse_decode",
    )(lengths.reshape(B, 1), page_table, sel.reshape(B, num_splits, per_split), qp, k_pages, v_pages)
    out, _ = _finish(o, m2, l, G, q.dtype, combine_in_kernel, interpret)
    return out

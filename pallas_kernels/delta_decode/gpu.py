"""Pallas Triton (GPU) kernels for DELTA decode, flash-decoding style.

Both kernels run one program per (batch, kv head, split); the `group` query heads of the kv
head share the program (q tile [Gp, head_dim], Gp = group padded to a power of two >= 16 for
the tensor cores). Each program writes unnormalized partial results (o, m2, l) that
`common.combine` merges across splits.

- `dense`: a split is a contiguous chunk of the cache, walked in `block_k` token steps up to
  the sequence length; it also stores the base-2 scaled logits of the real query heads (the
  page scores are computed from them once the final lse is known).
- `sparse`: a split is a run of the page selection; each step gathers `pages_per_block` pages
  (their indices read inside the kernel; -1 marks an invalid entry) as one
  [pages_per_block * page_size, head_dim] tile.

The splits are merged by a second small kernel (one program per (batch, kv head)) when the
group and the split count are powers of two, else by XLA ops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .common import MASK_VALUE, combine, precision, scale2 as _scale2

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def padded_group(group: int) -> int:
    return max(16, pl.next_power_of_2(group))


def _update(q, k, v, keep, carry, scale2, prec):
    """One online-softmax step; returns the new carry and the scaled logits."""
    m, l, acc = carry
    s = lax.dot_general(q, k, _NT, precision=prec, preferred_element_type=jnp.float32) * scale2
    sm = jnp.where(keep, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(sm, axis=1))
    p = jnp.where(keep, jnp.exp2(sm - m_new[:, None]), 0.0)
    corr = jnp.exp2(m - m_new)
    l = l * corr + jnp.sum(p, axis=1)
    acc = acc * corr[:, None] + lax.dot_general(p.astype(v.dtype), v, _NN, precision=prec,
                                                preferred_element_type=jnp.float32)
    return (m_new, l, acc), s


def _init(gp, d):
    return (jnp.full((gp,), MASK_VALUE, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, d), jnp.float32))


def _store_partials(o_ref, m_ref, l_ref, carry):
    m, l, acc = carry
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _dense_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, s_ref, *,
                  block_k, chunk, group, scale2, prec):
    length = len_ref[0]
    start = pl.program_id(2) * chunk
    steps = jnp.clip(pl.cdiv(length - start, block_k), 0, chunk // block_k)
    q = q_ref[...]
    gp, d = q.shape
    rows = lax.broadcasted_iota(jnp.int32, (gp, block_k), 0) < group
    cols = lax.broadcasted_iota(jnp.int32, (gp, block_k), 1)

    def body(i, carry):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        keep = start + i * block_k + cols < length
        carry, s = _update(q, k_ref[ks, :], v_ref[ks, :], keep, carry, scale2, prec)
        plgpu.store(s_ref.at[:, ks], s, mask=rows)
        return carry

    _store_partials(o_ref, m_ref, l_ref, lax.fori_loop(0, steps, body, _init(gp, d)))


def _sparse_kernel(len_ref, sel_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   pages_per_block, steps, scale2, prec):
    length = len_ref[0]
    q = q_ref[...]
    gp, d = q.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    offs = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)

    def body(i, carry):
        sel = sel_ref[pl.ds(pl.multiple_of(i * pages_per_block, pages_per_block), pages_per_block)]
        ids = jnp.maximum(sel, 0)
        pos = ids[:, None] * page_size + offs
        keep = ((pos < length) & (sel >= 0)[:, None]).reshape(1, block_k)
        k = k_ref[ids].reshape(block_k, d)
        v = v_ref[ids].reshape(block_k, d)
        carry, _ = _update(q, k, v, keep, carry, scale2, prec)
        return carry

    _store_partials(o_ref, m_ref, l_ref, lax.fori_loop(0, steps, body, _init(gp, d)))


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
    when the tiles are powers of two (in_kernel), else XLA."""
    B, hkv, n, gp, D = o.shape
    if not (in_kernel and pl.next_power_of_2(G) == G and pl.next_power_of_2(n) == n):
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


def dense(q, k, v, lengths, *, block_k, num_splits, num_warps, num_stages, combine_in_kernel=True,
          interpret=False):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D], lengths [B]; S % (num_splits * block_k) == 0.

    Returns out [B, Hkv, G, D], lse2 [B, Hkv, G], logits2 [B, Hkv, Gp, S] (rows >= G and tokens
    >= length unwritten)."""
    B, hkv, G, D = q.shape
    S = k.shape[2]
    chunk = S // num_splits
    qp, gp = _pad_group(q)
    kernel = functools.partial(_dense_kernel, block_k=block_k, chunk=chunk, group=G,
                               scale2=_scale2(D), prec=precision(q.dtype))
    kv_spec = pl.BlockSpec((None, None, chunk, D), lambda b, h, j: (b, h, j, 0))
    o, m2, l, s2 = pl.pallas_call(
        kernel,
        grid=(B, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, None, gp, D), lambda b, h, j: (b, h, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=_partial_specs(gp, D) + [
            pl.BlockSpec((None, None, gp, chunk), lambda b, h, j: (b, h, 0, j))],
        out_shape=_partial_shapes(B, hkv, num_splits, gp, D) + [
            jax.ShapeDtypeStruct((B, hkv, gp, S), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="delta_dense_decode",
    )(lengths.reshape(B, 1), qp, k, v)
    out, lse2 = _finish(o, m2, l, G, q.dtype, combine_in_kernel, interpret)
    return out, lse2, s2


def sparse(q, k, v, page_indices, page_valid, lengths, *, page_size, pages_per_block, num_splits,
           num_warps, num_stages, combine_in_kernel=True, interpret=False):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D], page_indices / page_valid [B, n] with
    n % (num_splits * pages_per_block) == 0, lengths [B] -> out [B, Hkv, G, D]."""
    B, hkv, G, D = q.shape
    S = k.shape[2]
    n = page_indices.shape[1]
    per_split = n // num_splits
    qp, gp = _pad_group(q)
    num_pages = S // page_size
    kp = k.reshape(B, hkv, num_pages, page_size, D)
    vp = v.reshape(B, hkv, num_pages, page_size, D)
    sel = jnp.where(page_valid, jnp.clip(page_indices, 0, num_pages - 1), -1)
    sel = sel.reshape(B, num_splits, per_split)
    kernel = functools.partial(_sparse_kernel, pages_per_block=pages_per_block,
                               steps=per_split // pages_per_block,
                               scale2=_scale2(D), prec=precision(q.dtype))
    page_spec = pl.BlockSpec((None, None, num_pages, page_size, D), lambda b, h, j: (b, h, 0, 0, 0))
    sel_spec = pl.BlockSpec((None, None, per_split), lambda b, h, j: (b, j, 0))
    o, m2, l = pl.pallas_call(
        kernel,
        grid=(B, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)), sel_spec,
                  pl.BlockSpec((None, None, gp, D), lambda b, h, j: (b, h, 0, 0)),
                  page_spec, page_spec],
        out_specs=_partial_specs(gp, D),
        out_shape=_partial_shapes(B, hkv, num_splits, gp, D),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="delta_sparse_decode",
    )(lengths.reshape(B, 1), sel, qp, kp, vp)
    out, _ = _finish(o, m2, l, G, q.dtype, combine_in_kernel, interpret)
    return out

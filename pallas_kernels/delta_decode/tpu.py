"""Pallas Mosaic TPU kernels for DELTA decode.

Grid (batch, kv head, step) with the step axis sequential ("arbitrary") and the online-softmax
state in VMEM scratch; the `group` query heads of a kv head share the program (q tile
[group, head_dim]). Scalars (lengths, the page selection) are prefetched into SMEM and read by
the index maps, so only the needed key/value tiles are copied in:

- `dense`: step j covers tokens [j * block_k, (j + 1) * block_k); steps past the length repeat
  the last valid tile (no new copy) and skip the compute. Also writes the base-2 scaled logits.
- `sparse`: step j copies page `page_indices[b, j]` ([page_size, head_dim] of k and v);
  invalid pages and tokens past the length are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import MASK_VALUE, precision, scale2 as _scale2

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def _step(q, k, v, keep, m_scr, l_scr, acc_scr, scale2, prec):
    s = lax.dot_general(q, k, _NT, precision=prec, preferred_element_type=jnp.float32) * scale2
    sm = jnp.where(keep, s, MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(sm, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp2(sm - m_new), 0.0)
    corr = jnp.exp2(m_prev - m_new)
    l_scr[...] = l_scr[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_new
    acc_scr[...] = acc_scr[...] * corr + lax.dot_general(
        p.astype(v.dtype), v, _NN, precision=prec, preferred_element_type=jnp.float32)
    return s


def _init(m_scr, l_scr, acc_scr):
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def _finish(o_ref, m_scr, l_scr, acc_scr, lse_ref=None):
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log2(l_safe))


def _dense_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, s_ref, m_scr, l_scr, acc_scr, *,
                  block_k, scale2, prec):
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(j == 0)
    def _():
        _init(m_scr, l_scr, acc_scr)

    @pl.when(j * block_k < length)
    def _():
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], block_k), 1)
        s_ref[...] = _step(q_ref[...], k_ref[...], v_ref[...], cols < length, m_scr, l_scr, acc_scr,
                           scale2, prec)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        _finish(o_ref, m_scr, l_scr, acc_scr, lse_ref)


def _sparse_kernel(len_ref, idx_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr,
                   *, n, page_size, scale2, prec):
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    page = idx_ref[b * n + j]

    @pl.when(j == 0)
    def _():
        _init(m_scr, l_scr, acc_scr)

    @pl.when((valid_ref[b * n + j] != 0) & (page * page_size < length))
    def _():
        cols = page * page_size + lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], page_size), 1)
        _step(q_ref[...], k_ref[...], v_ref[...], cols < length, m_scr, l_scr, acc_scr, scale2, prec)

    @pl.when(j == n - 1)
    def _():
        _finish(o_ref, m_scr, l_scr, acc_scr)


def _scratch(G, D):
    return [pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
            pltpu.VMEM((G, D), jnp.float32)]


def dense(q, k, v, lengths, *, block_k, interpret=False):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D] (S % block_k == 0), lengths [B] ->
    out [B, Hkv, G, D], lse2 [B, Hkv, G], logits2 [B, Hkv, G, S] (tiles past the length unwritten)."""
    B, hkv, G, D = q.shape
    S = k.shape[2]

    def kv_map(b, h, j, len_ref):
        return (b, h, jnp.minimum(j, jnp.maximum(len_ref[b] - 1, 0) // block_k), 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, hkv, S // block_k),
        in_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, j, _: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, block_k, D), kv_map),
                  pl.BlockSpec((None, None, block_k, D), kv_map)],
        out_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, j, _: (b, h, 0, 0)),
                   pl.BlockSpec((None, None, G, 1), lambda b, h, j, _: (b, h, 0, 0)),
                   pl.BlockSpec((None, None, G, block_k), lambda b, h, j, _: (b, h, 0, j))],
        scratch_shapes=_scratch(G, D),
    )
    kernel = functools.partial(_dense_kernel, block_k=block_k, scale2=_scale2(D), prec=precision(q.dtype))
    out, lse2, s2 = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, hkv, G, 1), jnp.float32),
                   jax.ShapeDtypeStruct((B, hkv, G, S), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="delta_dense_decode_tpu",
    )(lengths, q, k, v)
    return out, lse2[..., 0], s2


def sparse(q, k, v, page_indices, page_valid, lengths, *, page_size, interpret=False):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D], page_indices / page_valid [B, n], lengths [B] ->
    out [B, Hkv, G, D]."""
    B, hkv, G, D = q.shape
    S = k.shape[2]
    n = page_indices.shape[1]
    idx = jnp.clip(page_indices, 0, S // page_size - 1).reshape(-1).astype(jnp.int32)
    valid = page_valid.reshape(-1).astype(jnp.int32)

    def kv_map(b, h, j, len_ref, idx_ref, valid_ref):
        return (b, h, idx_ref[b * n + j], 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, hkv, n),
        in_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, page_size, D), kv_map),
                  pl.BlockSpec((None, None, page_size, D), kv_map)],
        out_specs=pl.BlockSpec((None, None, G, D), lambda b, h, j, *_: (b, h, 0, 0)),
        scratch_shapes=_scratch(G, D),
    )
    kernel = functools.partial(_sparse_kernel, n=n, page_size=page_size, scale2=_scale2(D),
                               prec=precision(q.dtype))
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="delta_sparse_decode_tpu",
    )(lengths, idx, valid, q, k, v)

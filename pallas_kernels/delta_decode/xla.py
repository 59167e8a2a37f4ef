"""Pure-JAX (XLA) DELTA decode attention over a paged KV cache: gather the pages, then einsum.

Same contracts as the Pallas kernels; the CPU path of the engine and a baseline elsewhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from .common import MASK_VALUE, precision, scale2


def _softmax_attend(q, s2, keep, v):
    """q [B, Hkv, G, D], s2 [B, Hkv, G, S], keep bool broadcastable to s2, v [B, Hkv, S, D] ->
    out [B, Hkv, G, D] in q's dtype, lse2 [B, Hkv, G] (-inf where no token is kept)."""
    s2 = jnp.where(keep, s2, MASK_VALUE)
    m = jnp.max(s2, axis=-1)
    p = jnp.where(keep, jnp.exp2(s2 - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v, precision=precision(v.dtype),
                     preferred_element_type=jnp.float32)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = (acc / l_safe[..., None]).astype(q.dtype)
    return out, jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def _logits2(q, k):
    return jnp.einsum("bhgd,bhsd->bhgs", q, k, precision=precision(q.dtype),
                      preferred_element_type=jnp.float32) * scale2(q.shape[-1])


def _gather(pages, physical):
    """pages [Hkv, P, page_size, D], physical int [B, n] -> [B, Hkv, n * page_size, D]."""
    hkv, _, page_size, D = pages.shape
    B, n = physical.shape
    return jnp.swapaxes(pages[:, physical], 0, 1).reshape(B, hkv, n * page_size, D)


def dense(q, k_pages, v_pages, page_table, lengths):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table [B, n], lengths [B] ->
    out [B, Hkv, G, D], lse2 [B, Hkv, G], logits2 [B, Hkv, G, n * page_size] (base-2 scaled,
    unmasked)."""
    k, v = _gather(k_pages, page_table), _gather(v_pages, page_table)
    s2 = _logits2(q, k)
    keep = jnp.arange(k.shape[2], dtype=jnp.int32)[None, None, None, :] < lengths[:, None, None, None]
    out, lse2 = _softmax_attend(q, s2, keep, v)
    return out, lse2, s2


def sparse(q, k_pages, v_pages, page_table, page_indices, page_valid, lengths):
    """q [B, Hkv, G, D], k/v_pages [Hkv, P, page_size, D], page_table [B, pages_per_seq],
    page_indices (logical, in range) / page_valid [B, n], lengths [B] -> out [B, Hkv, G, D]:
    attention over the tokens of the valid selected pages below the length."""
    B, n = page_indices.shape
    page_size = k_pages.shape[2]
    physical = jnp.take_along_axis(page_table, page_indices, axis=1)
    k, v = _gather(k_pages, physical), _gather(v_pages, physical)
    pos = page_indices[:, :, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
    keep = (pos < lengths[:, None, None]) & page_valid[:, :, None]
    out, _ = _softmax_attend(q, _logits2(q, k), keep.reshape(B, 1, 1, n * page_size), v)
    return out

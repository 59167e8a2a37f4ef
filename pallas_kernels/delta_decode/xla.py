"""Pure-JAX (XLA) DELTA decode attention: einsum over the cache, gather of the selected pages.

Same contracts as the Pallas kernels; efficient enough for CPU and a baseline elsewhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from .common import MASK_VALUE, precision, scale2


def _softmax_attend(q, s2, keep, v, einsum_v):
    s2 = jnp.where(keep, s2, MASK_VALUE)
    m = jnp.max(s2, axis=-1)
    p = jnp.where(keep, jnp.exp2(s2 - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum(einsum_v, p.astype(v.dtype), v, precision=precision(v.dtype),
                     preferred_element_type=jnp.float32)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = (acc / l_safe[..., None]).astype(q.dtype)
    return out, jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def dense(q, k, v, lengths):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D], lengths [B] ->
    out [B, Hkv, G, D], lse2 [B, Hkv, G], logits2 [B, Hkv, G, S] (base-2 scaled, unmasked)."""
    S = k.shape[2]
    s2 = jnp.einsum("bhgd,bhsd->bhgs", q, k, precision=precision(q.dtype),
                    preferred_element_type=jnp.float32) * scale2(q.shape[-1])
    keep = jnp.arange(S, dtype=jnp.int32)[None, None, None, :] < lengths[:, None, None, None]
    out, lse2 = _softmax_attend(q, s2, keep, v, "bhgs,bhsd->bhgd")
    return out, lse2, s2


def sparse(q, k, v, page_indices, page_valid, lengths, *, page_size):
    """q [B, Hkv, G, D], k/v [B, Hkv, S, D], page_indices / page_valid [B, n], lengths [B] ->
    out [B, Hkv, G, D]: attention over the tokens of the valid selected pages below length."""
    B, hkv, S, D = k.shape
    n = page_indices.shape[1]
    idx = jnp.clip(page_indices, 0, S // page_size - 1)
    gather = idx[:, None, :, None, None]
    kp = jnp.take_along_axis(k.reshape(B, hkv, S // page_size, page_size, D), gather, axis=2)
    vp = jnp.take_along_axis(v.reshape(B, hkv, S // page_size, page_size, D), gather, axis=2)
    kp, vp = kp.reshape(B, hkv, n * page_size, D), vp.reshape(B, hkv, n * page_size, D)
    pos = idx[:, :, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
    keep = (pos < lengths[:, None, None]) & page_valid[:, :, None]
    keep = keep.reshape(B, 1, 1, n * page_size)
    s2 = jnp.einsum("bhgd,bhsd->bhgs", q, kp, precision=precision(q.dtype),
                    preferred_element_type=jnp.float32) * scale2(D)
    out, _ = _softmax_attend(q, s2, keep, vp, "bhgs,bhsd->bhgd")
    return out

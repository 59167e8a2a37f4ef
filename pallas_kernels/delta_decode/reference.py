"""Pure-JAX references (float32, exact dots) for the DELTA decode kernels, over a CONTIGUOUS cache.

`k_cache, v_cache: [batch, kv_heads, max_seq, head_dim]` hold each sequence's logical tokens in
order (the paged kernels are tested against these on the same logical cache). Written
independently of the kernels: dense softmax over the whole cache, token masks instead of page
gathers, a lexicographic sort instead of top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .selection import finish_selection, valid_and_recent

_HI = lax.Precision.HIGHEST


def _probs(q, k_cache, keep):
    """q [B, Hq, D], k_cache [B, Hkv, S, D], keep bool [B, S] -> p float32 [B, Hq, S]."""
    B, hq, D = q.shape
    hkv = k_cache.shape[1]
    qg = q.astype(jnp.float32).reshape(B, hkv, hq // hkv, D)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache.astype(jnp.float32), precision=_HI) / jnp.sqrt(
        jnp.float32(D))
    s = jnp.where(keep[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.where(keep[:, None, None, :], p, 0.0).reshape(B, hq, -1)


def _attend(q, k_cache, v_cache, keep):
    B, hq, D = q.shape
    hkv = k_cache.shape[1]
    p = _probs(q, k_cache, keep).reshape(B, hkv, hq // hkv, -1)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, v_cache.astype(jnp.float32), precision=_HI)
    return out.reshape(B, hq, D)


def _length_mask(lengths, S):
    return jnp.arange(S)[None, :] < lengths[:, None]


def dense_decode_reference(q, k_cache, v_cache, lengths):
    """q [B, Hq, D], k/v_cache [B, Hkv, S, D], lengths [B] -> out float32 [B, Hq, D]."""
    return _attend(q, k_cache, v_cache, _length_mask(lengths, k_cache.shape[2]))


def token_maxima_reference(q, k_cache, lengths):
    """-> float32 [B, Hkv, S]: per kv head, the max over its group's query heads of the probability."""
    B, _, S, _ = k_cache.shape
    hkv = k_cache.shape[1]
    p = _probs(q, k_cache, _length_mask(lengths, S))
    return jnp.max(p.reshape(B, hkv, -1, S), axis=2)


def page_scores_reference(q, k_cache, lengths, page_size):
    """-> float32 [B, S // page_size]: sum over a page's tokens of the max over all query heads."""
    B, _, S, _ = k_cache.shape
    p = _probs(q, k_cache, _length_mask(lengths, S))
    return jnp.max(p, axis=1).reshape(B, S // page_size, page_size).sum(-1)


def select_pages_reference(page_scores, lengths, *, page_size, budget, recent):
    """Order pages by (recent first, then score descending, then index ascending), keep `budget`."""
    B, P = page_scores.shape
    valid, is_recent, num_valid = valid_and_recent(P, lengths, page_size, recent)
    rank_class = jnp.where(is_recent, 0, jnp.where(valid, 1, 2))
    pages = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    order = jnp.lexsort((pages, -page_scores.astype(jnp.float32), rank_class), axis=-1)
    chosen = order[:, :budget].astype(jnp.int32)
    if budget > P:
        chosen = jnp.pad(chosen, ((0, 0), (0, budget - P)), constant_values=P)
    return finish_selection(chosen, num_valid, P)


def sparse_decode_reference(q, k_cache, v_cache, page_indices, page_valid, lengths, page_size):
    """Attention over the tokens of the valid selected pages below each length."""
    B, _, S, _ = k_cache.shape
    P = S // page_size
    sel = jnp.zeros((B, P), jnp.int32).at[jnp.arange(B)[:, None], jnp.clip(page_indices, 0, P - 1)].max(
        page_valid.astype(jnp.int32))
    keep = (jnp.repeat(sel, page_size, axis=1) > 0) & _length_mask(lengths, S)
    return _attend(q, k_cache, v_cache, keep)

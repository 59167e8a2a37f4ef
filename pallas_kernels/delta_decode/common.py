"""Constants and the small XLA pieces shared by every backend of the DELTA decode kernels.

Kernels work in base 2 with the online softmax of `pallas_kernels.softmax`: scaled logits are
`s2 = (q . k) / sqrt(head_dim) * log2(e)`, so that `p = exp2(s2 - lse2)` with `lse2` the base-2
log-sum-exp of a query head over its valid tokens.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.softmax import MASK_VALUE, precision, scale2  # noqa: F401 (the kernels' one home)


def combine(o, m2, l):
    """Merges split partial results (flash-decoding).

    o [..., n, G, D] unnormalized float32, m2 / l [..., n, G] (base-2 running max, sum of
    exp2(s2 - m2)) -> out [..., G, D] float32, lse2 [..., G]. Heads with no valid token give
    out 0 and lse2 -inf.
    """
    m = jnp.max(m2, axis=-2)
    w = jnp.exp2(m2 - m[..., None, :])
    l_tot = jnp.sum(l * w, axis=-2)
    acc = jnp.sum(o * w[..., None], axis=-3)
    empty = l_tot == 0.0
    l_safe = jnp.where(empty, 1.0, l_tot)
    return acc / l_safe[..., None], jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def token_maxima(logits2, lse2, lengths):
    """max over the group's query heads of p[h, s] = exp2(s2[h, s] - lse2[h]).

    logits2 [B, Hkv, G, S], lse2 [B, Hkv, G], lengths [B] -> float32 [B, Hkv, S]; 0 at s >= length.
    """
    S = logits2.shape[-1]
    valid = jnp.arange(S, dtype=jnp.int32)[None, None, None, :] < lengths[:, None, None, None]
    p = jnp.where(valid, jnp.exp2(logits2 - lse2[..., None]), 0.0)
    return jnp.max(p, axis=2)


def page_scores_from_token_maxima(token_max, page_size: int):
    """Unified head selection scores from per-token maxima.

    token_max [B, Hkv, S] (per kv head; reduced here with a max over kv heads: under sharding
    of the kv heads replace that max by a pmax over the `model` axis first) or [B, S] (already
    reduced) -> page_scores float32 [B, S // page_size]: per page, the sum over its tokens of
    the max over all query heads of the attention probability.
    """
    if token_max.ndim == 3:
        token_max = jnp.max(token_max, axis=1)
    if token_max.ndim != 2:
        raise ValueError(f"token_max must have rank 2 or 3, got shape {token_max.shape}")
    B, S = token_max.shape
    if page_size < 1 or S % page_size:
        raise ValueError(f"page_size={page_size} must be >= 1 and divide the sequence length {S}")
    return jnp.sum(token_max.reshape(B, S // page_size, page_size), axis=-1)

"""Content-dependent block selection for a block-sparse base ("topk_blocks").

Each query block keeps its sink blocks and local (window) blocks, plus the `topk` other causal
key blocks with the largest pooled score: the mean of the block's queries over its rows and the
group's heads, dotted with the mean key of the key block, per kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "window", "sinks", "topk"))
def select_blocks(q, k, *, block_q, block_k, window, sinks, topk):
    """Returns (indices int32 [B, Hkv, nQ, L], counts int32 [B, Hkv, nQ]), indices ascending.

    q [B, T, H, D], k [B, T, Hkv, D]; nQ = ceil(T / block_q); entries past a count repeat the
    tile's last block. L = (forced blocks at most) + topk, capped at the number of key blocks.
    """
    B, T, H, D = q.shape
    hkv = k.shape[2]
    nq, nk = -(-T // block_q), -(-T // block_k)
    qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, nq * block_q - T), (0, 0), (0, 0)))
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nk * block_k - T), (0, 0), (0, 0)))
    rows_in = jnp.clip(T - jnp.arange(nq) * block_q, 1, block_q).astype(jnp.float32)
    keys_in = jnp.clip(T - jnp.arange(nk) * block_k, 1, block_k).astype(jnp.float32)
    q_mean = qp.reshape(B, nq, block_q, hkv, H // hkv, D).sum((2, 4)) / (rows_in[:, None, None] * (H // hkv))
    k_mean = kp.reshape(B, nk, block_k, hkv, D).sum(2) / keys_in[:, None, None]
    score = jnp.einsum("bqhd,bkhd->bhqk", q_mean, k_mean, precision=lax.Precision.HIGHEST)

    q_last = jnp.minimum((jnp.arange(nq) + 1) * block_q, T) - 1
    q_first = jnp.arange(nq) * block_q
    k_first = jnp.arange(nk) * block_k
    k_last = k_first + block_k - 1
    causal = k_first[None, :] <= q_last[:, None]
    local = k_last[None, :] > q_first[:, None] - window
    sink = k_first[None, :] < sinks
    forced = causal & (local | sink)
    n_forced = forced.sum(-1)
    max_forced = int(min(nk, -(-(window - 1 + block_q) // block_k) + 1 + -(-sinks // block_k)))
    L = int(min(nk, max_forced + topk))
    ranked = jnp.where(forced, jnp.inf, jnp.where(causal, score, -jnp.inf))
    vals, idx = lax.top_k(ranked, L)
    keep = (jnp.arange(L) < (n_forced + topk)[:, None]) & (vals > -jnp.inf)
    idx = jnp.sort(jnp.where(keep, idx, nk), axis=-1)
    counts = keep.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = jnp.where(jnp.arange(L) < counts[..., None], idx, last)
    return idx.astype(jnp.int32), counts


def block_mask_from_indices(indices, counts, num_k_blocks):
    """bool [B, Hkv, nQ, num_k_blocks]: which key blocks each query tile visits."""
    valid = jnp.arange(indices.shape[-1]) < counts[..., None]
    onehot = jax.nn.one_hot(indices, num_k_blocks, dtype=jnp.int32) * valid[..., None]
    return onehot.sum(-2) > 0

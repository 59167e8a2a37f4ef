"""Dense-mask pure-JAX references: simple, obviously right, O(T^2) memory.

All take `[batch, seq, heads, head_dim]` arrays and compute in float32 (or the input
dtype if it is wider) with `precision=HIGHEST`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _widen(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def masked_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + log mask) v. q [B, Tq, H, D], k/v [B, Tk, Hkv, D].

    mask: bool [B, Tq, Tk] (all heads) or [B, H, Tq, Tk].

    Returns (out [B, Tq, H, D] in the wide dtype, lse [B, H, Tq]). Rows with no key give 0 and -inf.
    """
    q, k, v = _widen(q), _widen(k), _widen(v)
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    s = s / np.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None] if mask.ndim == 3 else mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l == 0, 1, l), v,
                     precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l[..., 0] == 0, -jnp.inf, (m + jnp.log(l))[..., 0])
    return out, lse


def sparse_mask(q_pos, k_len, window, sinks):
    """[B, Tq, Tk] mask: `s <= t` and (`t - s < window` or `s < sinks`); window None = dense."""
    t = q_pos[:, :, None]
    s = jnp.arange(k_len)[None, None, :]
    keep = s <= t
    if window is not None:
        keep &= (t - s < window) | (s < sinks)
    return keep


@functools.partial(jax.jit, static_argnames=("window", "sinks", "return_lse"))
def sparse_attention_reference(q, k, v, *, window, sinks, return_lse=False):
    """Sliding window + sinks causal attention for every row."""
    B, T = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    out, lse = masked_attention(q, k, v, sparse_mask(pos, k.shape[1], window, sinks))
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("return_lse",))
def exact_rows_reference(q, k, v, rows, *, return_lse=False):
    """Exact causal attention for the rows `rows` [B, R]; out [B, R, H, D], lse [B, H, R]."""
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
    out, lse = masked_attention(qr, k, v, sparse_mask(rows, k.shape[1], None, 0))
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "window", "sinks"))
def block_sparse_reference(q, k, v, block_mask, *, block_q, block_k, window=None, sinks=0):
    """Causal attention restricted to key blocks.

    block_mask: bool [B, Hkv, ceil(T/block_q), ceil(T/block_k)], shared by the heads of a group.
    """
    B, T, H, _ = q.shape
    t = jnp.arange(T)
    allowed = block_mask[:, :, t // block_q][:, :, :, t // block_k]
    allowed = jnp.repeat(allowed, H // k.shape[2], axis=1)
    base = sparse_mask(jnp.broadcast_to(t, (B, T)), T, window, sinks)
    out, _ = masked_attention(q, k, v, allowed & base[:, None])
    return out


def delta_attention_reference(q, k, v, *, window, sinks, gamma, tail=None, smooth=False,
                              lengths=None, sparse_fn=None):
    """Delta Attention written row by row from the definition (ALGORITHMS.md section 1).

    `sparse_fn(q, k, v)` gives the sparse base [B, T, H, D] (default: window + sinks).
    Rows at or past `lengths[b]` are left at the sparse value. Returns a NumPy array.
    """
    B, T = q.shape[:2]
    tail = gamma if tail is None else tail
    if sparse_fn is None:
        sparse = sparse_attention_reference(q, k, v, window=window, sinks=sinks)
    else:
        sparse = sparse_fn(q, k, v)
    dense = np.asarray(sparse_attention_reference(q, k, v, window=None, sinks=0))
    sparse = np.asarray(sparse)
    lengths = np.full((B,), T) if lengths is None else np.asarray(lengths)
    out = []
    for b in range(B):
        L = int(lengths[b])
        start_tail = max(L - tail, 0)
        rows = []
        for t in range(T):
            if t >= L:
                rows.append(sparse[b, t])
            elif t >= start_tail:
                rows.append(dense[b, t])
            else:
                blk = t // gamma
                r = blk * gamma
                d = dense[b, r] - sparse[b, r]
                if smooth:
                    nxt = r + gamma
                    d_next = dense[b, nxt] - sparse[b, nxt] if nxt < start_tail else d
                    a = (t % gamma) / gamma
                    d = (1 - a) * d + a * d_next
                rows.append(sparse[b, t] + d)
        out.append(np.stack(rows))
    return np.stack(out)

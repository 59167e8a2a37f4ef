"""Dense-mask pure-JAX references: simple, obviously right, O(T^2) memory.

All take `[batch, seq, heads, head_dim]` arrays and compute in float32 (or the input
dtype if it is wider) with `precision=HIGHEST`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .correction import tail_rows


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

    `sparse_fn(q, k, v)` gives the sparse base [B, T, H, D] (default: window + sinks); the tail is
    `tail_rows(L_b, gamma, tail)` rows per sequence.
    Rows at or past `lengths[b]` are left at the sparse value. Returns a NumPy array.
    """
    B, T = q.shape[:2]
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
        start_tail = L - tail_rows(L, gamma, tail)
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


def _softmax_lse(sc):
    """Softmax along the last axis and its log-partition; a row with no finite score gives p = 0, lse = -inf."""
    mx = jnp.max(sc, -1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(sc - mx)
    z = jnp.sum(p, -1, keepdims=True)
    lse = jnp.where(z[..., 0] > 0, mx[..., 0] + jnp.log(jnp.where(z[..., 0] > 0, z[..., 0], 1.0)), -jnp.inf)
    return p / jnp.where(z > 0, z, 1.0), lse


@functools.partial(jax.jit, static_argnames=("window", "sinks", "gamma", "return_margin"))
def taylor_reference(q, k, v, *, window, sinks, gamma, lengths=None, return_margin=False):
    """The `taylor` variant (ours) for every row, from dense masks. Row t in the block of sampled
    row r = t - t % gamma splits its keys in three: its window and sinks (the sparse base), the band
    `[r - window + 1, t - window]` (attended exactly) and the far keys `[sinks, r - window]`. For the
    far keys each anchor query q_a (a in r - gamma, r, r + gamma; the first clipped to row 0, the last
    to the sequence's last sampled row) gives their exact log-partition lse_a, mean key mu_a and mean
    value F_a; the tightest tangent bound `lse_a + (q_t - q_a) . mu_a / sqrt(D)` gives the far weight
    and its anchor's F_a the far output, merged with the other two parts by their partitions.
    lengths int [B] or None. Returns [B, T, H, D] in the wide dtype (no exact tail), and with
    `return_margin` the gap between the tightest and the second tightest bound [B, T, H]: where it is
    within rounding, either anchor's F_a is the method's answer (the far output jumps between them)."""
    q, k, v = _widen(q), _widen(k), _widen(v)
    B, T, H, D = q.shape
    kvh, grp = k.shape[2], H // k.shape[2]
    hi = jax.lax.Precision.HIGHEST
    scale = 1.0 / np.sqrt(D)
    n = -(-T // gamma)
    L = jnp.full((B,), T) if lengths is None else jnp.asarray(lengths)
    sparse, lse = sparse_attention_reference(q, k, v, window=window, sinks=sinks, return_lse=True)
    r = jnp.arange(n) * gamma
    last = ((L - 1) // gamma) * gamma                                                  # [B]
    anchors = jnp.stack([jnp.broadcast_to(jnp.maximum(r - gamma, 0), (B, n)), jnp.broadcast_to(r, (B, n)),
                         jnp.minimum(r[None, :] + gamma, last[:, None])], 1)           # [B, 3, n]
    qa = jnp.take_along_axis(q, anchors.reshape(B, 3 * n)[:, :, None, None], axis=1)  # [B, 3n, H, D]
    sc = jnp.einsum("bnkgd,bskd->bnkgs", qa.reshape(B, 3 * n, kvh, grp, D), k, precision=hi) * scale
    key = jnp.arange(T)
    far_keys = (key[None, :] >= sinks) & (key[None, :] <= jnp.tile(r - window, 3)[:, None])   # [3n, T]
    p, lse_a = _softmax_lse(jnp.where(far_keys[None, :, None, None], sc, -jnp.inf))
    mu = jnp.einsum("bnkgs,bskd->bnkgd", p, k, precision=hi).reshape(B, 3, n, H, D)
    fv = jnp.einsum("bnkgs,bskd->bnkgd", p, v, precision=hi).reshape(B, 3, n, H, D)
    lse_a = lse_a.reshape(B, 3, n, H)
    blk = jnp.arange(T) // gamma
    qa = qa.reshape(B, 3, n, H, D)
    bounds = jnp.stack([lse_a[:, i][:, blk] + jnp.sum((q - qa[:, i][:, blk]) * mu[:, i][:, blk], -1) * scale
                        for i in range(3)])                                             # [3, B, T, H]
    best = jnp.argmax(jnp.where(jnp.isfinite(bounds), bounds, -1e30), 0)
    lse_far = jnp.max(bounds, 0)
    far_out = jnp.take_along_axis(fv[:, :, blk], best[:, None, ..., None], 1)[:, 0]     # [B, T, H, D]
    # the band: row t attends keys [r - window + 1, t - window] (and >= sinks)
    t = jnp.arange(T)[:, None]
    band_keys = (key[None, :] >= (t - t % gamma) - window + 1) & (key[None, :] <= t - window) & (key[None, :] >= sinks)
    band, lse_band = masked_attention(q, k, v, jnp.broadcast_to(band_keys, (B, T, T)))
    parts = jnp.stack([jnp.swapaxes(lse, 1, 2), jnp.swapaxes(lse_band, 1, 2), lse_far])   # [3, B, T, H]
    top = jnp.max(parts, 0)
    w = jnp.exp(parts - top[None])
    w = w / jnp.sum(w, 0)[None]
    out = w[0][..., None] * sparse + w[1][..., None] * band + w[2][..., None] * far_out
    if not return_margin:
        return out
    top2 = jax.lax.top_k(jnp.moveaxis(jnp.where(jnp.isfinite(bounds), bounds, -jnp.inf), 0, -1), 2)[0]
    return out, jnp.where(jnp.isfinite(top2[..., 0]), top2[..., 0] - top2[..., 1], jnp.inf)  # no far keys: no tie

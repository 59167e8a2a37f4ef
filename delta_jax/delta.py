"""The sparse methods inside the model: Delta Attention prefill and DELTA decode.

Prefill rows are right-padded with per-sequence `lengths [b]`; the exact rows are the strided rows
`0, gamma, 2 gamma, ...` (shared by the batch) and each sequence's own tail `[L_b - tail_b, L_b)`.
The kernels (`pallas_kernels`) compute the sparse base and the exact rows; this module picks the
rows and combines them per method and variant (cheap elementwise work).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from delta_jax import cache, sharding
from delta_jax.config import DecodeConfig, PrefillConfig
from pallas_kernels import delta_decode as dk
from pallas_kernels import pick_backend
from pallas_kernels import sparse_prefill as pk

# Kernel backend for the sparse methods: None picks Pallas on GPU/TPU and XLA on the CPU;
# DELTA_JAX_KERNEL_BACKEND=xla forces the blockwise XLA path (fast to compile, same numerics).
KERNEL_BACKEND = os.environ.get("DELTA_JAX_KERNEL_BACKEND") or None


def tail_lengths(lengths: jax.Array, method: PrefillConfig, t: int) -> tuple[jax.Array, int]:
    """Per-sequence exact tail rows `[b]` and their static upper bound."""
    g = method.gamma
    if method.tail is not None:
        tail = jnp.minimum(lengths, method.tail)
        return tail, min(method.tail, t)
    if g is None:
        return jnp.zeros_like(lengths), 0
    tail = jnp.minimum(lengths, lengths % g + max(128, g))
    return tail, min(t, g - 1 + max(128, g))


def _head_axis(kv_heads: int, batch: int):
    """The mesh, its head axis name and batch axis name when running per head shard, else None."""
    mesh = sharding.current_mesh()
    if mesh is None or mesh.shape["model"] == 1 or kv_heads % mesh.shape["model"]:
        return None
    return mesh, "model", ("data" if batch % mesh.shape["data"] == 0 else None)


def sparse_prefill(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                   method: PrefillConfig) -> jax.Array:
    """`window` (sparse-only or recompute) and `delta` prefill. q `[b, T, H, D]` -> `[b, T, H, D]`.

    Under a mesh whose `model` axis divides the KV heads, the kernels run per head shard in
    `shard_map` (every step is per head; the batch goes over `data` where it divides).
    """
    axes = _head_axis(k.shape[2], q.shape[0])
    if axes is None:
        return _sparse_prefill(q, k, v, lengths, method)
    mesh, model, data = axes
    spec = P(data, None, model, None)
    fn = sharding.shard_map(functools.partial(_sparse_prefill, method=method), mesh,
                            in_specs=(spec, spec, spec, P(data)), out_specs=spec)
    return fn(q, k, v, lengths)


def _sparse_prefill(q, k, v, lengths, method: PrefillConfig):
    b, t, h, d = q.shape
    window, sinks = min(method.window, t), min(method.sinks, t)
    if method.base == "topk_blocks":
        backend = pick_backend(KERNEL_BACKEND)
        bs = pk.default_block_sizes(backend, d)
        idx, cnt = pk.select_blocks(q, k, block_q=bs.block_q, block_k=bs.block_k, window=window,
                                    sinks=sinks, topk=method.topk)
        sparse, lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_q=bs.block_q, block_k=bs.block_k,
                                                return_lse=True, backend=backend)
    else:
        sparse, lse = pk.sparse_attention(q, k, v, window=window, sinks=sinks, return_lse=True,
                                           backend=KERNEL_BACKEND)
    tail, max_tail = tail_lengths(lengths, method, t)
    g = method.gamma
    n_strided = -(-t // g) if g is not None else 0
    if n_strided == 0 and max_tail == 0:
        return sparse
    taylor = method.method == "delta" and method.variant == "taylor"  # its sampled rows come out exact
    n_exact = 0 if taylor else n_strided
    strided = jnp.broadcast_to(jnp.arange(n_exact, dtype=jnp.int32) * (g or 1), (b, n_exact))
    tail_rows = jnp.clip(lengths[:, None] - max_tail + jnp.arange(max_tail, dtype=jnp.int32)[None, :], 0, t - 1)
    rows = jnp.concatenate([strided, tail_rows], axis=1)
    exact, exact_lse = (pk.exact_rows_attention(q, k, v, rows, return_lse=True, backend=KERNEL_BACKEND)
                        if rows.shape[1] else (None, None))
    exact_s, exact_t = (None, None) if exact is None else (exact[:, :n_exact], exact[:, n_exact:])

    pos = jnp.arange(t, dtype=jnp.int32)
    tail_start = (lengths - tail)[:, None]                       # [b, 1]
    in_tail = pos[None, :] >= tail_start                         # [b, T]
    if n_strided:
        blk = pos // g                                           # [T]
        if method.method == "window":                            # recompute: exact rows, no correction
            out = jnp.where((pos % g == 0)[None, :, None, None], exact_s[:, blk], sparse)
        elif taylor:
            out = _taylor(q, k, v, sparse, lse, g, window, sinks)
        else:
            fit = None
            if method.variant == "fitted":
                fit = _fit_lag_weights(sparse, exact_t, lengths, tail, max_tail, g)
            out = _correct(sparse, lse, exact_s, exact_lse[..., :n_strided], blk, tail_start, method, fit)
    else:
        out = sparse
    tail_idx = jnp.clip(pos[None, :] - lengths[:, None] + max_tail, 0, max(max_tail - 1, 0))
    if max_tail:
        from_tail = jnp.take_along_axis(exact_t, tail_idx[:, :, None, None], axis=1)
        out = jnp.where(in_tail[:, :, None, None], from_tail, out)
    return out.astype(q.dtype)


def _fit_lag_weights(sparse, exact_t, lengths, tail, max_tail, g):
    """Per sequence, head and lag d in [0, gamma): the least-squares weight alpha[d] of the correction
    c(t - d) as a predictor of c(t) = exact(t) - sparse(t), fitted on the contiguous exact tail rows
    and clipped to [0, 1]. Returns `[b, gamma, H]` (alpha[0] = 1)."""
    b, t, h, d = sparse.shape
    idx = jnp.clip(lengths[:, None] - max_tail + jnp.arange(max_tail)[None, :], 0, t - 1)
    s_tail = jnp.take_along_axis(sparse, idx[:, :, None, None], axis=1).astype(jnp.float32)
    c = exact_t.astype(jnp.float32) - s_tail                      # [b, max_tail, H, D]
    valid = (jnp.arange(max_tail)[None, :] >= (max_tail - tail)[:, None])   # [b, max_tail]
    c = c * valid[:, :, None, None]
    lag = jnp.arange(g)[:, None]                                   # [g, 1]
    later = jnp.arange(max_tail)[None, :] + lag                    # [g, max_tail]: row t + lag
    ok = (later < max_tail)
    c_later = jnp.where(ok[None, :, :, None, None], c[:, jnp.minimum(later, max_tail - 1)], 0.0)
    num = jnp.einsum("bltHd,btHd->blH", c_later, c)               # sum_t <c(t + lag), c(t)>
    den = jnp.einsum("lt,btH->blH", ok.astype(jnp.float32), jnp.sum(c * c, -1))  # valid rows form a suffix
    alpha = jnp.clip(num / jnp.maximum(den, 1e-20), 0.0, 1.0)
    return alpha.at[:, 0].set(1.0)


def _taylor(q, k, v, sparse, lse, g, window, sinks, row_chunk: int = 256):
    """The `taylor` variant (ours). Row t in the block of sampled row r = t - t % gamma splits its keys in
    three: its window and sinks (the sparse base: `sparse`, `lse [b, H, T]`), the band
    `[r - window + 1, t - window]` that left its window since r (< gamma keys, attended exactly), and the far
    keys `[sinks, r - window]`, shared by the whole block. For the far keys each anchor query q_a
    (a in r - gamma, r, r + gamma) gives their exact log-partition lse_a, mean key mu_a and mean value F_a.
    Log-sum-exp is convex in the query, so every tangent `lse_a + (q_t - q_a) . mu_a / sqrt(D)` is a lower
    bound on row t's far log-partition (tight at q_t = q_a, short by KL(p_t || p_a) otherwise); the tightest
    anchor gives the far weight and its F_a the far output, merged with the other two parts by their
    softmax weights; a sampled row (its own anchor, no band) comes out exact. Cost beyond the base: 3 exact
    passes over the far keys per block, and the band."""
    b, t, h, d = q.shape
    kvh, grp = k.shape[2], h // k.shape[2]
    f32 = jnp.float32
    prec = jax.lax.Precision.HIGHEST if q.dtype == f32 else None
    scale = 1.0 / float(d) ** 0.5
    n = -(-t // g)
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    # far statistics of each block's far keys under its three anchor queries, row chunks at a time
    r = jnp.arange(n) * g
    anchors = jnp.concatenate([jnp.maximum(r - g, 0), r, jnp.minimum(r + g, (n - 1) * g)])      # [3n]
    hi = jnp.tile(r - window, 3)                                                                 # [3n]
    pad = -(-3 * n // row_chunk) * row_chunk - 3 * n
    anchors_p = jnp.pad(anchors, (0, pad)).reshape(-1, row_chunk)
    hi_p = jnp.pad(hi, (0, pad), constant_values=-1).reshape(-1, row_chunk)
    kv = jnp.concatenate([kf, vf], -1)                                                           # [b, T, KVH, 2D]

    def far(args):
        rows, top = args
        qa = qf[:, rows].reshape(b, -1, kvh, grp, d)
        sc = jnp.einsum("bnkgd,bskd->bnkgs", qa, kf, precision=prec) * scale
        key = jnp.arange(t)
        keep = (key[None, :] >= sinks) & (key[None, :] <= top[:, None])                          # [c, T]
        p, lse_a = _softmax_lse(jnp.where(keep[None, :, None, None], sc, -jnp.inf))
        mean = jnp.einsum("bnkgs,bske->bnkge", p, kv, precision=prec)
        return lse_a.reshape(b, -1, h), mean.reshape(b, -1, h, 2 * d)

    lse_a, mean = jax.lax.map(far, (anchors_p, hi_p))
    lse_a = jnp.moveaxis(lse_a, 0, 1).reshape(b, -1, h)[:, :3 * n].reshape(b, 3, n, h)
    mean = jnp.moveaxis(mean, 0, 1).reshape(b, -1, h, 2 * d)[:, :3 * n].reshape(b, 3, n, h, 2 * d)
    blk = jnp.arange(t) // g
    bounds = []
    for i in range(3):
        dq = qf - qf[:, anchors[i * n:(i + 1) * n]][:, blk]                                       # [b, T, H, D]
        bounds.append(lse_a[:, i][:, blk] + jnp.sum(dq * mean[:, i, :, :, :d][:, blk], -1) * scale)
    bounds = jnp.stack(bounds)                                                                   # [3, b, T, H]
    best = jnp.argmax(jnp.where(jnp.isfinite(bounds), bounds, -1e30), 0)                        # [b, T, H]
    lse_far = jnp.max(bounds, 0)
    far_out = jnp.take_along_axis(mean[..., d:][:, :, blk], best[:, None, ..., None], 1)[:, 0]  # [b, T, H, D]
    # the band: row r + i attends keys r - window + 1 + j for j < i (and >= sinks)
    tp = n * g
    qb = jnp.pad(qf, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, n, g, kvh, grp, d)
    idx = (r[:, None] - window + 1 + jnp.arange(g)[None, :])                                     # [n, g]
    kb, vb = kf[:, jnp.clip(idx, 0, t - 1)], vf[:, jnp.clip(idx, 0, t - 1)]                      # [b, n, g, KVH, D]
    sc = jnp.einsum("bnikgd,bnjkd->bnkgij", qb, kb, precision=prec) * scale
    keep = (jnp.arange(g)[None, :, None] > jnp.arange(g)[None, None, :]) & (idx >= sinks)[:, None, :] \
        & (idx >= 0)[:, None, :]                                                                 # [n, i, j]
    p, lse_band = _softmax_lse(jnp.where(keep[None, :, None, None], sc, -jnp.inf))
    band = jnp.einsum("bnkgij,bnjkd->bnikgd", p, vb, precision=prec)
    band = band.reshape(b, tp, h, d)[:, :t]
    lse_band = jnp.moveaxis(lse_band, -1, 2).reshape(b, n, g, h).reshape(b, tp, h)[:, :t]
    # merge the three parts by their partitions
    parts = jnp.stack([jnp.swapaxes(lse, 1, 2), lse_band, lse_far])                              # [3, b, T, H]
    top = jnp.max(parts, 0)
    w = jnp.exp(parts - top[None])
    w = w / jnp.sum(w, 0)[None]
    return w[0][..., None] * sparse.astype(f32) + w[1][..., None] * band + w[2][..., None] * far_out


def _softmax_lse(sc):
    """Softmax along the last axis and its log-partition; a row with no finite score gives p = 0, lse = -inf."""
    mx = jnp.max(sc, -1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(sc - mx)
    z = jnp.sum(p, -1, keepdims=True)
    lse = jnp.where(z[..., 0] > 0, mx[..., 0] + jnp.log(jnp.maximum(z[..., 0], 1e-30)), -jnp.inf)
    return p / jnp.maximum(z, 1e-30), lse


def _correct(sparse, lse, exact_s, exact_lse, blk, tail_start, method: PrefillConfig, fit=None):
    """Delta correction of every row from its block's sampled row. Shapes: sparse `[b, T, H, D]`,
    lse `[b, H, T]`, exact_s `[b, n, H, D]`, exact_lse `[b, H, n]`, blk `[T]`."""
    g = method.gamma
    f32 = jnp.float32
    s = sparse.astype(f32)
    sampled = s[:, ::g]                                          # sparse output of the sampled rows
    delta = exact_s.astype(f32) - sampled                        # [b, n, H, D]
    if method.variant == "published":
        if not method.smooth:
            return s + delta[:, blk]
        n = delta.shape[1]
        a = ((jnp.arange(s.shape[1]) % g) / g).astype(f32)[None, :, None, None]
        nxt = jnp.minimum(blk + 1, n - 1)
        has_next = ((nxt * g) < tail_start) & (nxt > blk)[None, :]      # [b, T]
        d_next = jnp.where(has_next[:, :, None, None], delta[:, nxt], delta[:, blk])
        return s + (1 - a) * delta[:, blk] + a * d_next
    if method.variant == "fitted":
        lag = jnp.arange(s.shape[1]) % g
        return s + fit[:, lag][..., None] * delta[:, blk]
    if method.variant == "shrink":
        # per sequence and head, the least-squares coefficient of the next block's delta on this
        # block's: alpha = sum <d_j, d_j+1> / sum |d_j|^2, clipped to [0, 1]. Heads whose deltas do not
        # carry over to the neighbouring rows get alpha ~ 0 (the sparse base), smooth ones alpha ~ 1.
        n = delta.shape[1]
        ok = (jnp.arange(n)[None, :] * g < tail_start)                      # [b, n] sampled before the tail
        pair = (ok[:, :-1] & ok[:, 1:])[:, :, None]                         # [b, n-1, 1]
        num = jnp.sum(jnp.sum(delta[:, :-1] * delta[:, 1:], -1) * pair, 1)  # [b, H]
        den = jnp.sum(jnp.sum(delta[:, :-1] ** 2, -1) * pair, 1)
        alpha = jnp.clip(num / jnp.maximum(den, 1e-20), 0.0, 1.0)[:, None, :, None]
        out = s + alpha * delta[:, blk]
        is_sampled = (jnp.arange(s.shape[1]) % g == 0)[None, :, None, None]
        return jnp.where(is_sampled, exact_s.astype(f32)[:, blk], out)
    if method.variant == "gated":
        # per head and block: trust the delta as far as it agrees with the next block's delta
        nxt = jnp.concatenate([delta[:, 1:], delta[:, -1:]], axis=1)
        cos = jnp.sum(delta * nxt, -1) / (jnp.linalg.norm(delta, axis=-1) * jnp.linalg.norm(nxt, axis=-1) + 1e-9)
        gate = jnp.clip(cos, 0.0, 1.0)[..., None]                # [b, n, H, 1]
        out = s + (gate * delta)[:, blk]
        is_sampled = (jnp.arange(s.shape[1]) % g == 0)[None, :, None, None]
        return jnp.where(is_sampled, exact_s.astype(f32)[:, blk], out)
    # softmax-sum variants: row t's local sums plus the sampled row r's far sums
    l_t = jnp.swapaxes(lse, 1, 2)[..., None]                     # [b, T, H, 1]
    l_r = l_t[:, ::g]                                            # [b, n, H, 1]
    d_r = jnp.swapaxes(exact_lse, 1, 2)[..., None]               # [b, n, H, 1]
    if method.variant == "mix":
        # out = (1 - m_r) S(t) + m_r F(r), m_r the sampled row's far mass
        m_r = jnp.clip(1 - jnp.exp(l_r - d_r), 0.0, 1.0)
        far = (exact_s.astype(f32) - (1 - m_r) * sampled) / jnp.maximum(m_r, 1e-9)
        far = jnp.where(m_r > 1e-6, far, 0.0)
        return (1 - m_r[:, blk]) * s + m_r[:, blk] * far[:, blk]
    # "nd": out = (Z_loc(t) S(t) + Z_dense(r) A(r) - Z_loc(r) S(r)) / (Z_loc(t) + Z_dense(r) - Z_loc(r))
    lr, dr, er, sr = l_r[:, blk], d_r[:, blk], exact_s.astype(f32)[:, blk], sampled[:, blk]
    c = jnp.maximum(l_t, dr)
    wt, wd, wl = jnp.exp(l_t - c), jnp.exp(dr - c), jnp.exp(jnp.minimum(lr, dr) - c)
    far_z = jnp.maximum(wd - wl, 0.0)
    return (wt * s + wd * er - wl * sr) / (wt + far_z)


# ------------------------------------------------------------------------------------------ decode

def delta_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, lengths: jax.Array,
                 role: str, selection: Optional[tuple], method: DecodeConfig, axis: Optional[str] = None):
    """DELTA decode for a 'selection' or 'sparse' layer over the paged cache. q `[b, H, D]`, pages
    `[KVH, P, page_size, D]`, page_table `[b, W]`, lengths `[b]` (0: an inactive row).

    A selection layer attends densely and picks the pages (logical page indices shared by all heads of
    the following layers); a sparse layer attends to the selected pages only, read through the page table.
    Variants: "published"; "sum" (selection layers rank pages by the head-mean of the softmax instead of
    its head-max); "per_layer" (the upper bound for per-layer methods: every non-full layer picks its own
    pages from its own exact scores, then attends to them only). Called per head shard: `axis` names the
    mesh axis over which the head maximum (or mean) of the page scores is reduced before the selection,
    so every shard keeps the same pages.
    """
    ps, budget, recent = method.page_size, method.budget, method.recent
    kw = dict(backend=KERNEL_BACKEND)

    def select(q):
        """Dense attention and the page selection from scores reduced over all heads of all shards."""
        if method.variant == "sum":
            out = dk.paged_decode_attention(q, k_pages, v_pages, page_table, lengths, **kw)
            scores = page_mass(q, cache.gather(k_pages, page_table), lengths, ps)
            scores = scores if axis is None else jax.lax.pmean(scores, axis)
        else:
            out, tmax = dk.paged_decode_attention(q, k_pages, v_pages, page_table, lengths, scores="tokens", **kw)
            tmax = tmax.max(axis=1, keepdims=True)
            tmax = tmax if axis is None else jax.lax.pmax(tmax, axis)
            scores = dk.page_scores_from_token_maxima(tmax, ps)
        return out, dk.select_pages(scores, lengths, page_size=ps, budget=budget, recent=recent)

    if method.variant == "per_layer":
        _, own = select(q)
        return dk.paged_sparse_decode_attention(q, k_pages, v_pages, page_table, *own, lengths, **kw), own
    if role == "selection":
        return select(q)
    if selection is None:
        raise ValueError("a sparse decode layer needs a selection layer before it")
    return dk.paged_sparse_decode_attention(q, k_pages, v_pages, page_table, *selection, lengths, **kw), selection


def page_stats(q: jax.Array, kc: jax.Array, lengths: jax.Array, page_size: int):
    """Per page `[b, S // page_size]` of a contiguous cache `kc [b, KVH, S, D]`: the softmax mass averaged
    over all query heads (sums to 1), and DELTA's score (sum over the page's tokens of the maximum over
    all query heads)."""
    b, h, d = q.shape
    kvh, s = kc.shape[1], kc.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32)
    sc = jnp.einsum("bkgd,bksd->bkgs", qg, kc.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    valid = jnp.arange(s)[None, :] < lengths[:, None]
    p = jax.nn.softmax(jnp.where(valid[:, None, None, :], sc, -jnp.inf), axis=-1)
    p = jnp.where(valid[:, None, None, :], p, 0.0)  # an inactive row (length 0) has no mass
    pages = (b, s // page_size, page_size)
    return p.mean(axis=(1, 2)).reshape(pages).sum(-1), p.max(axis=(1, 2)).reshape(pages).sum(-1)


def page_mass(q: jax.Array, kc: jax.Array, lengths: jax.Array, page_size: int) -> jax.Array:
    """Softmax mass per page, averaged over all query heads: `[b, S // page_size]`."""
    return page_stats(q, kc, lengths, page_size)[0]

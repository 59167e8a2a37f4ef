"""Delta Attention's exact rows and the corrections built from them (cheap elementwise XLA work).

Rows are right-padded with per-sequence `lengths [B]` (None: every sequence has T rows). The exact
rows are the strided rows `0, gamma, 2 gamma, ...` (shared by the batch, covering [0, T)) and each
sequence's own tail `[L_b - tail_b, L_b)`; the tail columns of the exact-rows array hold
`[L_b - M, L_b)` for the static bound `M = max_tail_rows(T, gamma, tail)` (clipped at row 0).
Rows in a sequence's tail get their exact value; rows at or past `L_b` keep the sparse base.

Every correction is written over blocks of gamma rows (`[B, n, gamma, H, D]`), so no index array
of length T appears (XLA would constant-fold it for seconds at long T).

Variants of the correction (`variant`):
- "published": the paper's, `out[t] = sparse[t] + delta[r]` (r: t's sampled row), `smooth`
  interpolating toward the next block's delta;
- "recompute": no correction, the exact rows only (the authors' recompute mode);
- ours: "shrink" (per sequence and head, the delta scaled by the least-squares coefficient of the
  next block's delta on this block's), "fitted" (per sequence, head and lag, the weight of the
  sampled row's delta fitted on the contiguous exact tail), "gated" (per head and block, the delta
  scaled by its cosine with the next block's), "mix" (row t's local output mixed with the sampled
  row's far output at the sampled row's far mass), "nd" (row t's local softmax sums plus the
  sampled row's far sums), "taylor" (each row's own far attention from tangent bounds of the far
  log-partition at three sampled queries: `taylor_combine`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

VARIANTS = ("published", "nd", "mix", "gated", "shrink", "fitted", "taylor")
CORRECTIONS = ("recompute",) + VARIANTS


def tail_rows(length, gamma, tail=None):
    """Exact tail rows of a sequence of `length` rows (an int, or an int array [B] per sequence):
    `tail`, else the authors' default `length % gamma + max(128, gamma)` (none without gamma);
    never more than `length`."""
    if tail is None:
        tail = 0 if gamma is None else length % gamma + max(128, gamma)
    return jnp.minimum(length, tail) if isinstance(length, jax.Array) else min(length, tail)


def max_tail_rows(T: int, gamma, tail=None) -> int:
    """Static bound on `tail_rows` over lengths <= T (the tail columns of the exact rows)."""
    if tail is None:
        return 0 if gamma is None else min(T, gamma - 1 + max(128, gamma))
    return min(T, tail)


def num_strided(T: int, gamma) -> int:
    """Number of strided rows, ceil(T / gamma) (0 without gamma)."""
    return 0 if gamma is None else -(-T // gamma)


def _lengths(lengths, B, T):
    return jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("T", "gamma", "tail", "batch", "strided"))
def delta_rows(T: int, gamma, tail=None, lengths=None, batch: int = 1, strided: bool = True):
    """The exact rows, int32 [B, ceil(T / gamma) + M]: the strided rows j * gamma (left out when not
    `strided`), then each sequence's tail columns [L_b - M, L_b) clipped at 0, M =
    `max_tail_rows(T, gamma, tail)`. lengths: int [B] or None (L_b = T)."""
    lengths = _lengths(lengths, batch, T)
    B = lengths.shape[0]
    n = num_strided(T, gamma) if strided else 0
    m = max_tail_rows(T, gamma, tail)
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * (gamma or 1), (B, n))
    tail_cols = jnp.maximum(lengths[:, None] - m + jnp.arange(m, dtype=jnp.int32)[None, :], 0)
    return jnp.concatenate([rows, tail_cols], axis=1)


def _blocks(x, n, gamma):
    """[B, T, ...] -> [B, n, gamma, ...] (rows past T zero)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * gamma - x.shape[1])
    return jnp.pad(x, pad).reshape((x.shape[0], n, gamma) + x.shape[2:])


def _rows(x, T):
    """[B, n, gamma, ...] -> [B, T, ...]."""
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :T]


@functools.partial(jax.jit, static_argnames=("gamma", "tail"))
def finish_rows(out, sparse, exact_tail, lengths, gamma, tail):
    """Tail rows of each sequence from `exact_tail` [B, M, H, D] (the tail columns of
    `delta_rows`), rows at or past L_b from `sparse`, the others from `out` (float32)."""
    B, T = out.shape[:2]
    m = exact_tail.shape[1]
    if lengths is None:
        n_tail = tail_rows(T, gamma, tail)
        if n_tail:
            out = out.at[:, T - n_tail:].set(exact_tail[:, m - n_tail:].astype(out.dtype))
        return out
    lengths = jnp.asarray(lengths, jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    if m:
        col = t - (lengths - m)[:, None]
        in_tail = (t >= (lengths - tail_rows(lengths, gamma, tail))[:, None]) & (t < lengths[:, None])
        from_tail = jnp.take_along_axis(exact_tail, jnp.clip(col, 0, m - 1)[:, :, None, None], axis=1)
        out = jnp.where(in_tail[:, :, None, None], from_tail.astype(out.dtype), out)
    return jnp.where((t < lengths[:, None])[:, :, None, None], out, sparse.astype(out.dtype))


@functools.partial(jax.jit, static_argnames=("gamma", "tail", "variant", "smooth"))
def delta_correct(sparse, exact, lengths=None, *, gamma, tail=None, variant: str = "published",
                  smooth: bool = False, sparse_lse=None, exact_lse=None):
    """The correction of every row from the exact rows. sparse [B, T, H, D] (every row), exact
    [B, R, H, D] for the rows of `delta_rows(T, gamma, tail, lengths)`; "nd" and "mix" also need
    sparse_lse [B, H, T] and exact_lse [B, H, R]. Returns [B, T, H, D] in sparse's dtype."""
    if variant not in CORRECTIONS or variant == "taylor":
        raise ValueError(f"variant must be one of {tuple(c for c in CORRECTIONS if c != 'taylor')}, got {variant!r}"
                         " (taylor: taylor_combine)")
    if variant in ("nd", "mix") and (sparse_lse is None or exact_lse is None):
        raise ValueError(f"variant {variant!r} needs sparse_lse and exact_lse")
    B, T, H, D = sparse.shape
    n = num_strided(T, gamma)
    m = max_tail_rows(T, gamma, tail)
    if exact.shape[1] != n + m:
        raise ValueError(f"exact must hold {n} strided + {m} tail rows, got {exact.shape[1]}")
    f32 = jnp.float32
    s = sparse.astype(f32)
    exact_s, exact_t = exact[:, :n].astype(f32), exact[:, n:].astype(f32)
    if n:
        sb = _blocks(s, n, gamma)                                         # [B, n, g, H, D]
        L = _lengths(lengths, B, T)
        tails = tail_rows(L, gamma, tail)
        fit = _fit_lag_weights(s, exact_t, L, tails, gamma) if variant == "fitted" else None
        out = _correct(sb, exact_s, L - tails, gamma, variant, smooth, fit,
                       None if sparse_lse is None else _blocks(jnp.swapaxes(sparse_lse, 1, 2), n, gamma),
                       None if exact_lse is None else jnp.swapaxes(exact_lse[..., :n], 1, 2))
        out = _rows(out, T)
    else:
        out = s
    return finish_rows(out, s, exact_t, lengths, gamma, tail).astype(sparse.dtype)


def _correct(sb, exact_s, tail_start, g, variant, smooth, fit, lse_b, exact_lse):
    """The corrected blocks [B, n, g, H, D] (float32)."""
    B, n = sb.shape[:2]
    sampled = sb[:, :, 0]                                                 # sparse output of the sampled rows
    delta = exact_s - sampled                                             # [B, n, H, D]
    exact_first = lambda out: out.at[:, :, 0].set(exact_s)
    if variant == "recompute":
        return exact_first(sb)
    if variant == "published":
        if not smooth:
            return sb + delta[:, :, None]
        a = (jnp.arange(g, dtype=jnp.float32) / g)[None, None, :, None, None]
        has_next = ((jnp.arange(n) + 1) * g)[None, :] < tail_start[:, None]           # [B, n]
        nxt = jnp.concatenate([delta[:, 1:], delta[:, -1:]], axis=1)
        nxt = jnp.where(has_next[:, :, None, None], nxt, delta)
        return sb + (1 - a) * delta[:, :, None] + a * nxt[:, :, None]
    if variant == "fitted":
        return sb + fit[:, None, :, :, None] * delta[:, :, None]
    if variant == "shrink":
        # alpha = sum <d_j, d_j+1> / sum |d_j|^2 over the sampled rows before the tail, clipped to
        # [0, 1]: heads whose deltas do not carry to the next block get ~0 (the sparse base)
        ok = jnp.arange(n)[None, :] * g < tail_start[:, None]              # [B, n]
        pair = (ok[:, :-1] & ok[:, 1:])[:, :, None]
        num = jnp.sum(jnp.sum(delta[:, :-1] * delta[:, 1:], -1) * pair, 1)  # [B, H]
        den = jnp.sum(jnp.sum(delta[:, :-1] ** 2, -1) * pair, 1)
        alpha = jnp.clip(num / jnp.maximum(den, 1e-20), 0.0, 1.0)[:, None, None, :, None]
        return exact_first(sb + alpha * delta[:, :, None])
    if variant == "gated":
        nxt = jnp.concatenate([delta[:, 1:], delta[:, -1:]], axis=1)
        cos = jnp.sum(delta * nxt, -1) / (jnp.linalg.norm(delta, axis=-1) * jnp.linalg.norm(nxt, axis=-1) + 1e-9)
        gate = jnp.clip(cos, 0.0, 1.0)[..., None]                         # [B, n, H, 1]
        return exact_first(sb + (gate * delta)[:, :, None])
    # softmax-sum variants: row t's local sums plus the sampled row r's far sums
    l_t = lse_b[..., None]                                                # [B, n, g, H, 1]
    l_r = l_t[:, :, 0]                                                    # [B, n, H, 1]
    d_r = exact_lse[..., None]                                            # [B, n, H, 1]
    if variant == "mix":
        m_r = jnp.clip(1 - jnp.exp(l_r - d_r), 0.0, 1.0)
        far = (exact_s - (1 - m_r) * sampled) / jnp.maximum(m_r, 1e-9)
        far = jnp.where(m_r > 1e-6, far, 0.0)
        return (1 - m_r[:, :, None]) * sb + (m_r * far)[:, :, None]
    # "nd": (Z_loc(t) S(t) + Z_dense(r) A(r) - Z_loc(r) S(r)) / (Z_loc(t) + Z_dense(r) - Z_loc(r))
    lr, dr, er, sr = l_r[:, :, None], d_r[:, :, None], exact_s[:, :, None], sampled[:, :, None]
    c = jnp.maximum(l_t, dr)
    wt, wd, wl = jnp.exp(l_t - c), jnp.exp(dr - c), jnp.exp(jnp.minimum(lr, dr) - c)
    far_z = jnp.maximum(wd - wl, 0.0)
    return (wt * sb + wd * er - wl * sr) / (wt + far_z)


def _fit_lag_weights(s, exact_t, lengths, tails, g):
    """Per sequence, head and lag d in [0, gamma): the least-squares weight alpha[d] of the correction
    c(t - d) as a predictor of c(t) = exact(t) - sparse(t), fitted on the contiguous exact tail rows
    and clipped to [0, 1]. s [B, T, H, D], exact_t [B, M, H, D], lengths and tails [B].
    Returns `[B, gamma, H]` (alpha[0] = 1)."""
    T = s.shape[1]
    m = exact_t.shape[1]
    idx = jnp.clip(lengths[:, None] - m + jnp.arange(m)[None, :], 0, T - 1)
    c = exact_t - jnp.take_along_axis(s, idx[:, :, None, None], axis=1)  # [B, M, H, D]
    valid = jnp.arange(m)[None, :] >= (m - tails)[:, None]                # [B, M]
    c = c * valid[:, :, None, None]
    lag = jnp.arange(g)[:, None]                                          # [g, 1]
    later = jnp.arange(m)[None, :] + lag                                  # [g, M]: row t + lag
    ok = later < m
    c_later = jnp.where(ok[None, :, :, None, None], c[:, jnp.minimum(later, m - 1)], 0.0)
    num = jnp.einsum("bltHd,btHd->blH", c_later, c)                      # sum_t <c(t + lag), c(t)>
    den = jnp.einsum("lt,btH->blH", ok.astype(jnp.float32), jnp.sum(c * c, -1))  # valid rows form a suffix
    alpha = jnp.clip(num / jnp.maximum(den, 1e-20), 0.0, 1.0)
    return alpha.at[:, 0].set(1.0)


def taylor_anchors(x, lengths, gamma, T):
    """Per block j, the three anchors' entries of a per-anchor, per-phase array x [B, n, H, 3, ...]
    (phase p of anchor a: the far keys of block a - 1 + p): anchor j - 1 (phase 2), j (phase 1) and
    j + 1 (phase 0), the first clipped to j = 0 and the last to the sequence's last sampled row.
    Returns [B, n, H, 3, ...] in that order."""
    own = x[:, :, :, 1]
    lower = jnp.concatenate([own[:, :1], x[:, :-1, :, 2]], axis=1)
    upper = jnp.concatenate([x[:, 1:, :, 0], own[:, -1:]], axis=1)
    n = x.shape[1]
    has_next = (jnp.arange(n) + 1)[None, :] * gamma < _lengths(lengths, x.shape[0], T)[:, None]   # [B, n]
    has_next = has_next.reshape(has_next.shape + (1,) * (upper.ndim - 2))
    return jnp.stack([lower, own, jnp.where(has_next, upper, own)], axis=3)


@functools.partial(jax.jit, static_argnames=("gamma",))
def taylor_combine(q, local, local_lse, far_k, far_v, far_lse, lengths=None, *, gamma):
    """The `taylor` rows. Row t in the block of sampled row r = t - t % gamma: its local part (window,
    sinks and the band `[r - window + 1, t - window]`: local [B, T, H, D], local_lse [B, H, T]) merged
    with its far part (keys `[sinks, r - window]`), whose log-partition is the tightest of the
    tangent bounds `lse_a + (q_t - q_a) . mu_a / sqrt(D)` of the block's three anchor queries
    (exact far lse_a, mean key mu_a, mean value F_a: far_k / far_v [B, n, H, 3, D], far_lse
    [B, n, H, 3] per anchor and phase, see `taylor_anchors`) and whose output is that anchor's
    F_a. Log-sum-exp is convex in the query, so each bound is below row t's far log-partition,
    short by KL(p_t || p_a); a sampled row is its own anchor and comes out exact. Returns float32
    [B, T, H, D]."""
    B, T, H, D = q.shape
    n = far_k.shape[1]
    f32 = jnp.float32
    qa = q[:, ::gamma].astype(f32)                                        # [B, n, H, D]
    anchor_q = taylor_anchors(jnp.broadcast_to(qa[:, :, :, None], qa.shape[:3] + (3, D)), lengths, gamma, T)
    mu = taylor_anchors(far_k, lengths, gamma, T)                         # [B, n, H, 3, D]
    fv = taylor_anchors(far_v, lengths, gamma, T)
    lse_a = taylor_anchors(far_lse, lengths, gamma, T)                    # [B, n, H, 3]
    scale = 1.0 / D ** 0.5
    hi = jax.lax.Precision.HIGHEST
    # lse_a + (q_t - q_a) . mu_a * scale, as a batched dot (no [B, T, H, 3, D] intermediate)
    at_anchor = lse_a - jnp.sum(anchor_q * mu, -1) * scale                # [B, n, H, 3]
    qb = _blocks(q.astype(f32), n, gamma)                                 # [B, n, g, H, D]
    bounds = at_anchor[:, :, None] + jnp.einsum("bngHd,bnHad->bngHa", qb, mu, precision=hi) * scale
    best = jnp.argmax(jnp.where(jnp.isfinite(bounds), bounds, -1e30), -1)  # [B, n, g, H]
    lse_far = jnp.max(bounds, -1)
    far_out = jnp.where((best == 0)[..., None], fv[:, :, None, :, 0],
                        jnp.where((best == 1)[..., None], fv[:, :, None, :, 1], fv[:, :, None, :, 2]))
    lse_loc = _blocks(jnp.swapaxes(local_lse, 1, 2), n, gamma)           # [B, n, g, H]
    top = jnp.maximum(lse_loc, lse_far)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_loc, w_far = jnp.exp(lse_loc - top), jnp.exp(lse_far - top)
    out = (w_loc[..., None] * _blocks(local.astype(f32), n, gamma) + w_far[..., None] * far_out) \
        / (w_loc + w_far)[..., None]
    return _rows(out, T)

"""Block-sparse prefill attention for Delta Attention (Willette et al., arXiv 2505.11254).

Shapes follow `jax.nn.dot_product_attention`: q [batch, seq, heads, head_dim], k/v
[batch, seq, kv_heads, head_dim], heads = group * kv_heads. Causal, softmax scale
1/sqrt(head_dim), float32 accumulation, output in q's dtype.

- `sparse_attention`: sliding window + sink columns, only the key blocks that touch them.
- `exact_rows_attention`: exact causal attention for chosen rows (Delta's sampled rows).
- `block_sparse_attention`: causal attention over a per-tile list of key blocks.
- `delta_attention`: sparse base + exact strided rows and tail + Delta correction.
- `delta_rows` / `delta_correct`: the row layout and the correction, for other combinations.

Backends: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic TPU), "xla" (blockwise pure JAX);
None picks from `jax.default_backend()`. `interpret=True` runs the Pallas kernel in interpret
mode (`pltpu.InterpretParams()` for "tpu").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import pick_backend
import numpy as np

from . import gpu, tpu, xla
from .schedule import FAR, Listed, window_ranges, window_steps
from .topk_blocks import select_blocks

__all__ = [
    "BlockSizes", "sparse_attention", "exact_rows_attention", "block_sparse_attention",
    "delta_attention", "delta_rows", "delta_correct", "select_blocks", "default_block_sizes",
]

SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes.

    block_q: query positions per tile (sparse and block-sparse kernels).
    block_k: keys per key block.
    block_rows: (row, head) pairs per tile of the exact-rows kernel; the `group` query heads of
      a kv head are folded into the tile, so a tile holds block_rows / group rows.
    num_warps, num_stages: Triton settings (gpu only).
    fold_heads: gpu sparse kernel: put the `group` heads of a kv head into one tile of block_q
      rows (block_q / group positions), loading each key block once per group (used when the
      group is a power of two dividing block_q).
    """

    block_q: int = 128
    block_k: int = 64
    block_rows: int = 128
    num_warps: int = 4
    num_stages: int = 2
    fold_heads: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_rows"):
            val = getattr(self, name)
            if val < 1 or val & (val - 1):
                raise ValueError(f"{name} must be a positive power of two, got {val}")


def default_block_sizes(backend: str, head_dim: int = 128, kind: str = "sparse") -> BlockSizes:
    """Defaults per backend and kernel kind ("sparse": window/sinks and block lists; "rows":
    exact rows). gpu: measured on an H100 (benchmarks/results); tpu: (8, 128) tiling multiples."""
    if backend == "gpu":
        if kind == "rows":
            return BlockSizes(block_q=128, block_k=128, block_rows=128, num_warps=8, num_stages=3)
        return BlockSizes(block_q=64, block_k=64, block_rows=128, num_warps=4, num_stages=3,
                          fold_heads=True)
    if backend == "tpu":
        return BlockSizes(block_q=128, block_k=128, block_rows=256)
    return BlockSizes(block_q=128, block_k=128, block_rows=128)




def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must share batch, seq and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} is not a multiple of kv heads {k.shape[2]}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} dtype {x.dtype} unsupported; use float32, bfloat16 or float16")


def _check_window(window, sinks):
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if int(sinks) < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _round_up(x, m):
    return -(-x // m) * m


def _pad_seq(x, length, mode="constant"):
    if x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, mode=mode)


def _fold(q, rows, group):
    """q [B, T, H, D], rows [B, R] -> qf [B, Hkv, R * group, D], pos [B, R * group]."""
    B, _, H, D = q.shape
    R = rows.shape[1]
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
    qf = qr.reshape(B, R, H // group, group, D).transpose(0, 2, 1, 3, 4).reshape(B, H // group, R * group, D)
    return qf, jnp.repeat(rows, group, axis=1)


def _unfold(out, lse, R, group):
    """out [B, Hkv, N, D], lse [B, Hkv, N] -> [B, R, H, D], [B, H, R]."""
    B, hkv, _, D = out.shape
    out = out[:, :, :R * group].reshape(B, hkv, R, group, D).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :R * group].reshape(B, hkv, R, group).transpose(0, 1, 3, 2)
    return out.reshape(B, R, hkv * group, D), lse.reshape(B, hkv * group, R)


def _folded_attend(backend, qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks, interpret):
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kw = dict(block_rows=block_rows, block_k=block_k, window=window, sinks=sinks)
    if backend == "tpu":
        return tpu.attend(qf, pos, kt, vt, schedule, interpret=interpret, **kw)
    return xla.attend(qf, pos, kt, vt, schedule, **kw)


@functools.partial(jax.jit, static_argnames=("window", "sinks", "backend", "interpret", "bs", "gathered"))
def _attend_rows(q, k, v, rows, *, window, sinks, backend, interpret, bs, gathered):
    """Window/sinks (window=FAR: exact) causal attention for `rows` [B, R]; rows = arange(T)
    when not `gathered`. Returns out [B, R, H, D], lse [B, H, R]."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    if rows is None:
        rows = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rows = rows.astype(jnp.int32)
    R = rows.shape[1]
    fold = (backend == "gpu" and bs.fold_heads and group > 1 and group & (group - 1) == 0
            and bs.block_q % group == 0)
    if fold and not gathered:
        tq = _round_up(T, bs.block_q // group)
        tk = _round_up(tq, bs.block_k)
        out, lse = gpu.attend_grouped(
            _pad_seq(q, tq), _pad_seq(k, tk), _pad_seq(v, tk), block_q=bs.block_q, block_k=bs.block_k,
            window=window, sinks=sinks, num_warps=bs.num_warps, num_stages=bs.num_stages,
            interpret=interpret)
        return out[:, :T], lse[:, :, :T]
    if backend == "gpu" and not gathered:
        tq = _round_up(T, bs.block_q)
        tk = _round_up(tq, bs.block_k)
        out, lse = gpu.attend_direct(
            _pad_seq(q, tq), _pad_seq(k, tk), _pad_seq(v, tk), block_q=bs.block_q, block_k=bs.block_k,
            window=window, sinks=sinks, num_warps=bs.num_warps, num_stages=bs.num_stages,
            interpret=interpret)
        return out[:, :T], lse[:, :, :T]
    block_rows = bs.block_q * group if not gathered else bs.block_rows
    tk = _round_up(T, bs.block_k)
    kp, vp = _pad_seq(k, tk), _pad_seq(v, tk)
    qf, pos = _fold(q, rows, group)
    n = _round_up(R * group, block_rows)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, n - R * group), (0, 0)))
    pos = _pad_seq(pos, n, mode="edge")
    if backend == "gpu":
        out, lse = gpu.attend_folded(qf, pos, kp, vp, block_rows=block_rows, block_k=bs.block_k,
                                     window=window, sinks=sinks, num_warps=bs.num_warps,
                                     num_stages=bs.num_stages, interpret=interpret)
    else:
        nkb = tk // bs.block_k
        steps = nkb if gathered else window_steps(bs.block_q, block_k=bs.block_k, num_k_blocks=nkb,
                                                  window=window, sinks=sinks)
        sched = window_ranges(pos, k.shape[2], block_rows=block_rows, block_k=bs.block_k,
                              num_k_blocks=nkb, window=window, sinks=sinks, steps=steps)
        out, lse = _folded_attend(backend, qf, pos, kp, vp, sched, block_rows=block_rows,
                                  block_k=bs.block_k, window=window, sinks=sinks, interpret=interpret)
    return _unfold(out, lse, R, group)


def _setup(q, k, v, backend, block_sizes, kind="sparse"):
    _check_qkv(q, k, v)
    backend = pick_backend(backend)
    bs = block_sizes or default_block_sizes(backend, q.shape[-1], kind)
    return backend, bs


def sparse_attention(q, k, v, *, window: int, sinks: int, backend: Optional[str] = None,
                     interpret=False, return_lse: bool = False, block_sizes: Optional[BlockSizes] = None):
    """Row t attends to keys s <= t with t - window < s or s < sinks.

    q [B, T, H, D], k/v [B, T, Hkv, D] -> out [B, T, H, D] (and lse float32 [B, H, T],
    natural log of the sum of exp(scaled scores) over the attended keys).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes)
    _check_window(window, sinks)
    B, T = q.shape[:2]
    window = FAR if window >= T else int(window)
    sinks = 0 if window == FAR else min(int(sinks), T)
    out, lse = _attend_rows(q, k, v, None, window=window, sinks=sinks, backend=backend,
                            interpret=interpret, bs=bs, gathered=False)
    return (out, lse) if return_lse else out


def exact_rows_attention(q, k, v, rows, *, backend: Optional[str] = None, interpret=False,
                         return_lse: bool = False, block_sizes: Optional[BlockSizes] = None):
    """Exact causal attention for the rows `rows` int32 [B, R] (each in [0, T)).

    Returns out [B, R, H, D] = softmax(q[b, r] k[b, :r+1]^T / sqrt(D)) v[b, :r+1] (and lse
    [B, H, R]). A tile visits the key blocks up to its largest row: sorted rows do least work.
    """
    backend, bs = _setup(q, k, v, backend, block_sizes, kind="rows")
    rows = jnp.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
        raise ValueError(f"rows must have shape [batch={q.shape[0]}, R], got {rows.shape}")
    if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"rows must be integers, got dtype {rows.dtype}")
    if _is_concrete(rows) and rows.size:
        lo, hi = int(np.min(np.asarray(rows))), int(np.max(np.asarray(rows)))
        if lo < 0 or hi >= q.shape[1]:
            raise ValueError(f"rows must lie in [0, {q.shape[1]}), got values in [{lo}, {hi}]")
    out, lse = _attend_rows(q, k, v, rows, window=FAR, sinks=0, backend=backend,
                            interpret=interpret, bs=bs, gathered=True)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "window", "sinks", "backend",
                                             "interpret", "bs"))
def _block_sparse(q, k, v, indices, counts, *, block_q, block_k, window, sinks, backend, interpret, bs):
    B, T, H, D = q.shape
    hkv = k.shape[2]
    group = H // hkv
    nq = indices.shape[2]
    tq = nq * block_q
    tk = _round_up(max(T, tq), block_k)
    L = indices.shape[-1]
    indices, counts = indices.astype(jnp.int32), counts.astype(jnp.int32)
    if backend == "gpu":
        lp = 1 << max(L - 1, 0).bit_length()
        idx = jnp.pad(indices, ((0, 0),) * 3 + ((0, lp - L),))
        out, lse = gpu.attend_direct(
            _pad_seq(q, tq), _pad_seq(k, tk), _pad_seq(v, tk), block_q=block_q, block_k=block_k,
            window=window, sinks=sinks, indices=idx, counts=counts, num_warps=bs.num_warps,
            num_stages=bs.num_stages, interpret=interpret)
        return out[:, :T], lse[:, :, :T]
    rows = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (B, tq))
    qf, pos = _fold(_pad_seq(q, tq), rows, group)
    out, lse = _folded_attend(backend, qf, pos, _pad_seq(k, tk), _pad_seq(v, tk),
                              Listed(indices, counts, L), block_rows=block_q * group, block_k=block_k,
                              window=window, sinks=sinks, interpret=interpret)
    out, lse = _unfold(out, lse, tq, group)
    return out[:, :T], lse[:, :, :T]


def block_sparse_attention(q, k, v, block_indices, block_counts, *, block_q: int, block_k: int,
                           window: Optional[int] = None, sinks: Optional[int] = None,
                           backend: Optional[str] = None, interpret=False, return_lse: bool = False,
                           block_sizes: Optional[BlockSizes] = None):
    """Causal attention of each query tile over a list of key blocks.

    block_indices int32 [B, Hkv, ceil(T / block_q), L]: key block numbers (of size block_k);
    block_counts int32 [B, Hkv, ceil(T / block_q)]: how many entries of each list are used
    (each listed block at most once). The heads of a group share their kv head's lists.
    With `window` (and `sinks`), the window/sinks mask also applies inside the blocks.
    `block_sizes` supplies num_warps/num_stages (gpu).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes)
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a positive power of two, got {val}")
    B, T, H, _ = q.shape
    nq = -(-T // block_q)
    want = (B, k.shape[2], nq)
    if block_indices.ndim != 4 or tuple(block_indices.shape[:3]) != want:
        raise ValueError(f"block_indices must have shape {want + ('L',)}, got {block_indices.shape}")
    if tuple(block_counts.shape) != want:
        raise ValueError(f"block_counts must have shape {want}, got {block_counts.shape}")
    if window is not None:
        _check_window(window, sinks or 0)
    win = FAR if window is None or window >= T else int(window)
    snk = 0 if win == FAR else int(sinks or 0)
    out, lse = _block_sparse(q, k, v, block_indices, block_counts,
                             block_q=block_q, block_k=block_k, window=win, sinks=snk, backend=backend,
                             interpret=interpret, bs=bs)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("T", "gamma", "tail", "batch"))
def delta_rows(T: int, gamma: int, tail: int, lengths=None, batch: int = 1):
    """The exact rows of Delta Attention, int32 [B, ceil(T / gamma) + tail].

    Columns [0, ceil(T / gamma)) hold the strided rows j * gamma (the same for every sequence,
    covering all of [0, T)); the last `tail` columns hold each sequence's tail
    [L_b - tail, L_b) (clipped at 0 when L_b < tail). lengths: int [B] or None (L_b = T).
    """
    lengths = jnp.full((batch,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    B = lengths.shape[0]
    strided = jnp.broadcast_to(jnp.arange(0, T, gamma, dtype=jnp.int32), (B, -(-T // gamma)))
    tail_rows = jnp.maximum(lengths[:, None] - tail + jnp.arange(tail, dtype=jnp.int32)[None, :], 0)
    return jnp.concatenate([strided, tail_rows], axis=1)


@functools.partial(jax.jit, static_argnames=("gamma", "tail", "smooth"))
def delta_correct(sparse_out, exact_out, lengths=None, *, gamma: int, tail: int, smooth: bool = False):
    """Delta correction. sparse_out [B, T, H, D] (every row), exact_out [B, R, H, D] for the rows
    of `delta_rows(T, gamma, tail, lengths)`. Row t < L_b - tail of block b = t // gamma gets
    sparse[t] + delta[b * gamma] (smooth: (1 - a) delta[b] + a delta[b + 1], a = (t mod gamma) /
    gamma, the last block reusing its own); tail rows get the exact rows; rows >= L_b the sparse.
    """
    B, T, H, D = sparse_out.shape
    ns = -(-T // gamma)
    sp = sparse_out.astype(jnp.float32)
    delta = exact_out[:, :ns].astype(jnp.float32) - sp[:, ::gamma]  # [B, ns, H, D]
    # blocks of gamma rows as an axis: no index arrays over T (XLA would constant-fold them)
    blocks = _pad_seq(sp, ns * gamma).reshape(B, ns, gamma, H, D)
    d = delta[:, :, None]
    if smooth:
        tail_start = (jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)) - tail
        has_next = ((jnp.arange(ns) + 1) * gamma)[None, :] < tail_start[:, None]
        nxt = jnp.concatenate([delta[:, 1:], delta[:, -1:]], axis=1)
        nxt = jnp.where(has_next[:, :, None, None], nxt, delta)[:, :, None]
        a = (jnp.arange(gamma, dtype=jnp.float32) / gamma)[None, None, :, None, None]
        d = (1 - a) * d + a * nxt
    out = (blocks + d).reshape(B, ns * gamma, H, D)[:, :T]
    if lengths is None:
        if tail:
            out = out.at[:, T - tail:].set(exact_out[:, ns:].astype(jnp.float32))
        return out.astype(sparse_out.dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    if tail:
        ti = t[None, :] - (lengths - tail)[:, None]
        in_tail = (ti >= 0) & (t[None, :] < lengths[:, None])
        exact_tail = jnp.take_along_axis(exact_out[:, ns:], jnp.clip(ti, 0, tail - 1)[:, :, None, None], axis=1)
        out = jnp.where(in_tail[:, :, None, None], exact_tail.astype(jnp.float32), out)
    out = jnp.where((t[None, :] < lengths[:, None])[:, :, None, None], out, sp)
    return out.astype(sparse_out.dtype)


def delta_attention(q, k, v, *, window: int, sinks: int, gamma: int = 64, tail: Optional[int] = None,
                    smooth: bool = False, base: str = "window", lengths=None, topk: Optional[int] = None,
                    backend: Optional[str] = None, interpret=False,
                    block_sizes: Optional[BlockSizes] = None, rows_block_sizes: Optional[BlockSizes] = None):
    """Delta Attention (ALGORITHMS.md section 1): a sparse base for every row, exact strided rows
    every `gamma` and an exact tail (default `gamma` rows), corrected by delta = exact - sparse.

    base: "window" (sliding window + sinks) or "topk_blocks" (sinks and local blocks plus the
    `topk` best key blocks per query block by pooled score). lengths int [B]: valid length of
    each right-padded sequence (rows past it hold the sparse value). Returns [B, T, H, D].
    block_sizes: the sparse kernel's tiles; rows_block_sizes: the exact-rows kernel's (defaults
    per backend: `default_block_sizes(backend, head_dim, kind)`).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes)
    _check_window(window, sinks)
    B, T = q.shape[:2]
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    tail = gamma if tail is None else tail
    if tail < 0 or tail > T:
        raise ValueError(f"tail must be in [0, T={T}], got {tail}")
    if base not in ("window", "topk_blocks"):
        raise ValueError(f"base must be 'window' or 'topk_blocks', got {base!r}")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape [batch={B}], got {lengths.shape}")
        if _is_concrete(lengths) and (np.min(np.asarray(lengths)) < 1 or np.max(np.asarray(lengths)) > T):
            raise ValueError(f"lengths must lie in [1, T={T}], got {np.asarray(lengths).tolist()}")
    kw = dict(backend=backend, interpret=interpret, block_sizes=bs)
    if base == "window":
        sparse = sparse_attention(q, k, v, window=window, sinks=sinks, **kw)
    else:
        if topk is None or topk < 0:
            raise ValueError(f"base='topk_blocks' needs topk >= 0, got {topk}")
        idx, cnt = select_blocks(q, k, block_q=bs.block_q, block_k=bs.block_k, window=window,
                                 sinks=sinks, topk=topk)
        sparse = block_sparse_attention(q, k, v, idx, cnt, block_q=bs.block_q, block_k=bs.block_k, **kw)
    rows = delta_rows(T, gamma, tail, lengths, batch=B)
    exact = exact_rows_attention(q, k, v, rows, backend=backend, interpret=interpret,
                                 block_sizes=rows_block_sizes or block_sizes)
    return delta_correct(sparse, exact, lengths, gamma=gamma, tail=tail, smooth=smooth)

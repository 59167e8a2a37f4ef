"""Block-sparse prefill attention for Delta Attention (Willette et al., arXiv 2505.11254).

Shapes follow `jax.nn.dot_product_attention`: q [batch, seq, heads, head_dim], k/v
[batch, seq, kv_heads, head_dim], heads = group * kv_heads. Causal, softmax scale
1/sqrt(head_dim), float32 accumulation, output in q's dtype.

- `sparse_attention`: sliding window + sink columns, only the key blocks that touch them (with
  `gamma`, each row's window starts at its block's sampled row: the `taylor` local keys).
- `exact_rows_attention`: exact causal attention for chosen rows (Delta's sampled rows).
- `block_sparse_attention`: causal attention over a per-tile list of key blocks.
- `far_statistics`: the far-key statistics of the `taylor` variant's anchor queries.
- `delta_attention`: the whole method: sparse base + exact strided rows and tail + the published
  correction or one of our variants (`correction.VARIANTS`), per-sequence `lengths`.
- `delta_rows` / `delta_correct` / `taylor_combine` / `tail_rows`: the row layout, the tail rule
  and the corrections, for other combinations.

Backends: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic TPU), "xla" (blockwise pure JAX);
None picks from `jax.default_backend()`. `interpret=True` runs the Pallas kernel in interpret
mode (`pltpu.InterpretParams()` for "tpu").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import pick_backend

from . import gpu, hopper, tpu, xla
from .correction import (CORRECTIONS, VARIANTS, delta_correct, delta_rows, finish_rows, max_tail_rows,
                         tail_rows, taylor_combine)
from .schedule import FAR, Listed, phase_ranges, window_ranges, window_steps
from .topk_blocks import select_blocks

__all__ = [
    "BlockSizes", "sparse_attention", "exact_rows_attention", "block_sparse_attention", "far_statistics",
    "delta_attention", "delta_rows", "delta_correct", "taylor_combine", "tail_rows", "max_tail_rows",
    "select_blocks", "default_block_sizes", "shared_memory_bytes", "KINDS", "SHARED_MEMORY", "VARIANTS",
    "CORRECTIONS",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


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
    one_loop: gpu window kernel: walk the sink blocks, the band edges and the interior in one
      loop with every block masked (else four loops, the interior unmasked).
    hopper: gpu window kernel on a Hopper GPU with bf16/f16 operands: the Mosaic GPU kernel
      (`hopper.py`, wgmma and TMA, its own `HopperBlocks`) instead of the Triton one.
    """

    block_q: int = 128
    block_k: int = 64
    block_rows: int = 128
    num_warps: int = 4
    num_stages: int = 2
    fold_heads: bool = False
    one_loop: bool = False
    hopper: bool = True

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_rows"):
            val = getattr(self, name)
            if val < 1 or val & (val - 1):
                raise ValueError(f"{name} must be a positive power of two, got {val}")


KINDS = ("sparse", "rows", "far")
SHARED_MEMORY = 232448  # bytes of shared memory one Triton program may use on Hopper (227 KiB)

# H100-tuned tiles, shrunk by `_fit` where they do not fit: "sparse" and "rows" from
# benchmarks/results/prefill_attention_h100_run2*, "far" from
# benchmarks/results/h100_2026-12-06/session4/prefill_attention_far_tuned_tune.json (26.8 ms at 256K
# against 45.0 with 8 warps)
_GPU_TILES = {
    "sparse": BlockSizes(block_q=64, block_k=64, block_rows=128, num_warps=4, num_stages=3, fold_heads=True),
    "rows": BlockSizes(block_q=128, block_k=128, block_rows=128, num_warps=8, num_stages=3),
    "far": BlockSizes(block_q=64, block_k=64, block_rows=64, num_warps=4, num_stages=3),
}


def shared_memory_bytes(kind: str, bs: BlockSizes, head_dim: int, dtype) -> int:
    """Shared memory a gpu kernel's tile choice needs (an upper bound): Triton's software pipeline
    keeps `num_stages` copies of the k and v tiles [block_k, head_dim] in shared memory, and the
    query tile may stay there as a dot operand for the whole loop; the far kernel ("far") also reads
    the k tile as the operand of its mean-key dot, counted once more. kind: "sparse" (window/sinks,
    the taylor local keys, block lists; tile block_q rows), "rows" (exact rows; block_rows) or
    "far" (far statistics; block_rows). The pipelined k/v term alone is what Triton requested for
    float32 exact rows at head_dim 128 with the H100 tiles (128, 128, 3 stages): 393216 bytes."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    item = jnp.dtype(dtype).itemsize
    rows = bs.block_q if kind == "sparse" else bs.block_rows
    kv = bs.num_stages * 2 * bs.block_k * head_dim * item
    extra = bs.block_k * head_dim * item if kind == "far" else 0
    return kv + rows * head_dim * item + extra


def _fit(kind, bs, head_dim, dtype):
    """The tile with fewer pipeline stages, then smaller key blocks, then fewer rows, until it fits."""
    while shared_memory_bytes(kind, bs, head_dim, dtype) > SHARED_MEMORY:
        rows = "block_q" if kind == "sparse" else "block_rows"
        if bs.num_stages > 2:
            bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
        elif bs.block_k > 32:
            bs = dataclasses.replace(bs, block_k=bs.block_k // 2)
        elif getattr(bs, rows) > 16:
            bs = dataclasses.replace(bs, **{rows: getattr(bs, rows) // 2})
        else:
            raise ValueError(f"no {kind} tile fits {SHARED_MEMORY} bytes of shared memory at head_dim {head_dim}")
    return bs


def default_block_sizes(backend: str, head_dim: int = 128, kind: str = "sparse", dtype=jnp.bfloat16) -> BlockSizes:
    """Defaults per backend, kernel kind ("sparse": window/sinks and block lists; "rows": exact rows;
    "far": far statistics) and dtype. gpu: measured on an H100, shrunk to fit shared memory
    (`shared_memory_bytes`); tpu: (8, 128) tiling multiples."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if backend == "gpu":
        return _fit(kind, _GPU_TILES[kind], head_dim, dtype)
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


def _folded_attend(backend, qf, pos, k, v, schedule, *, block_rows, block_k, window, sinks, gamma=None,
                   interpret):
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kw = dict(block_rows=block_rows, block_k=block_k, window=window, sinks=sinks, gamma=gamma)
    if backend == "tpu":
        return tpu.attend(qf, pos, kt, vt, schedule, interpret=interpret, **kw)
    return xla.attend(qf, pos, kt, vt, schedule, tiles_at_once=_xla_tiles_at_once(window), **kw)


def _xla_tiles_at_once(window):
    """xla: query tiles per step. On the CPU, dense causal attention (window FAR) walks its tiles one
    at a time, each over its own causal key blocks (half the work of a padded batch of tiles);
    elsewhere every tile at once."""
    return 1 if window >= FAR and jax.default_backend() == "cpu" else None


@functools.partial(jax.jit, static_argnames=("window", "sinks", "gamma", "backend", "interpret", "bs",
                                             "gathered"))
def _attend_rows(q, k, v, rows, *, window, sinks, backend, interpret, bs, gathered, gamma=None):
    """Window/sinks (window=FAR: exact) causal attention for `rows` [B, R]; rows = arange(T)
    when not `gathered`; with `gamma` the window starts at the row's block start. Returns out
    [B, R, H, D], lse [B, H, R]."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    if rows is None:
        rows = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rows = rows.astype(jnp.int32)
    R = rows.shape[1]
    if backend == "gpu" and not gathered and bs.hopper and not interpret and hopper.supported(q, k):
        blocks = hopper.HopperBlocks()
        tq = _round_up(T, math.lcm(2 * blocks.block_q, blocks.block_k))
        out, lse = hopper.attend_window(_pad_seq(q, tq), _pad_seq(k, tq), _pad_seq(v, tq), window=window,
                                        sinks=sinks, gamma=gamma, blocks=blocks)
        return out[:, :T], lse[:, :, :T]
    fold = (backend == "gpu" and bs.fold_heads and group > 1 and group & (group - 1) == 0
            and bs.block_q % group == 0)
    if fold and not gathered:
        tq = _round_up(T, bs.block_q // group)
        tk = _round_up(tq, bs.block_k)
        out, lse = gpu.attend_grouped(
            _pad_seq(q, tq), _pad_seq(k, tk), _pad_seq(v, tk), block_q=bs.block_q, block_k=bs.block_k,
            window=window, sinks=sinks, gamma=gamma, num_warps=bs.num_warps, num_stages=bs.num_stages,
            one_loop=bs.one_loop, interpret=interpret)
        return out[:, :T], lse[:, :, :T]
    if backend == "gpu" and not gathered:
        tq = _round_up(T, bs.block_q)
        tk = _round_up(tq, bs.block_k)
        out, lse = gpu.attend_direct(
            _pad_seq(q, tq), _pad_seq(k, tk), _pad_seq(v, tk), block_q=bs.block_q, block_k=bs.block_k,
            window=window, sinks=sinks, gamma=gamma, num_warps=bs.num_warps, num_stages=bs.num_stages,
            one_loop=bs.one_loop, interpret=interpret)
        return out[:, :T], lse[:, :, :T]
    block_rows = bs.block_q * group if not gathered else bs.block_rows
    tk = _round_up(T, bs.block_k)
    kp, vp = _pad_seq(k, tk), _pad_seq(v, tk)
    qf, pos = _fold(q, rows, group)
    n = _round_up(R * group, block_rows)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, n - R * group), (0, 0)))
    pos = _pad_seq(pos, n, mode="edge")
    if backend == "gpu":
        if gamma is not None:
            raise NotImplementedError("gathered rows with a block-aligned window")
        out, lse = gpu.attend_folded(qf, pos, kp, vp, block_rows=block_rows, block_k=bs.block_k,
                                     window=window, sinks=sinks, num_warps=bs.num_warps,
                                     num_stages=bs.num_stages, interpret=interpret)
    else:
        nkb = tk // bs.block_k
        steps = nkb if gathered else window_steps(bs.block_q, block_k=bs.block_k, num_k_blocks=nkb,
                                                  window=window, sinks=sinks, gamma=gamma)
        sched = window_ranges(pos, k.shape[2], block_rows=block_rows, block_k=bs.block_k,
                              num_k_blocks=nkb, window=window, sinks=sinks, steps=steps, gamma=gamma)
        out, lse = _folded_attend(backend, qf, pos, kp, vp, sched, block_rows=block_rows,
                                  block_k=bs.block_k, window=window, sinks=sinks, gamma=gamma,
                                  interpret=interpret)
    return _unfold(out, lse, R, group)


def _setup(q, k, v, backend, block_sizes, kind="sparse"):
    _check_qkv(q, k, v)
    backend = pick_backend(backend)
    bs = block_sizes or default_block_sizes(backend, q.shape[-1], kind, q.dtype)
    return backend, bs


def _check_gamma(gamma):
    if gamma is not None and int(gamma) < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")


def sparse_attention(q, k, v, *, window: int, sinks: int, gamma: Optional[int] = None,
                     backend: Optional[str] = None, interpret=False, return_lse: bool = False,
                     block_sizes: Optional[BlockSizes] = None):
    """Row t attends to keys s <= t with start(t) - window < s or s < sinks; start(t) = t, or with
    `gamma` the first row of t's block of gamma rows (the window of the block's sampled row plus
    the band of keys that left row t's own window since then: the `taylor` local keys).

    q [B, T, H, D], k/v [B, T, Hkv, D] -> out [B, T, H, D] (and lse float32 [B, H, T],
    natural log of the sum of exp(scaled scores) over the attended keys).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes)
    _check_window(window, sinks)
    _check_gamma(gamma)
    B, T = q.shape[:2]
    window = FAR if window >= T else int(window)
    sinks = 0 if window == FAR else min(int(sinks), T)
    gamma = None if window == FAR or gamma is None else min(int(gamma), T)
    out, lse = _attend_rows(q, k, v, None, window=window, sinks=sinks, gamma=gamma, backend=backend,
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


def _far_cuts(window, gamma):
    """Phase ends of an anchor at row a * gamma, relative to it: the far ranges of blocks a - 1, a
    and a + 1 end at (a - 1) gamma - window, a gamma - window and (a + 1) gamma - window."""
    return (-gamma - window, -window, gamma - window)


@functools.partial(jax.jit, static_argnames=("window", "sinks", "gamma", "backend", "interpret", "bs"))
def _far(q, k, v, *, window, sinks, gamma, backend, interpret, bs):
    B, T, H, D = q.shape
    hkv = k.shape[2]
    group = H // hkv
    n = -(-T // gamma)
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * gamma, (B, n))
    qf, pos = _fold(q, rows, group)
    N = _round_up(n * group, bs.block_rows)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, N - n * group), (0, 0)))
    pos = _pad_seq(pos, N, mode="edge")
    tk = _round_up(T, bs.block_k)
    kp, vp = _pad_seq(k, tk), _pad_seq(v, tk)
    kw = dict(block_rows=bs.block_rows, block_k=bs.block_k, cuts=_far_cuts(window, gamma), sinks=sinks, seq_len=T)
    if backend == "gpu":
        mk, mv, lse = gpu.far_phases(qf, pos, kp, vp, num_warps=bs.num_warps, num_stages=bs.num_stages,
                                     interpret=interpret, **kw)
    else:
        nkb = tk // bs.block_k
        # phases 1 and 2 span the tile's anchors (block_rows / group + 1 of them, gamma apart) + gamma keys
        band = min(nkb, -(-(bs.block_rows // group + 2) * gamma // bs.block_k) + 1)
        sched = phase_ranges(pos, hkv, block_rows=bs.block_rows, block_k=bs.block_k, num_k_blocks=nkb,
                             cuts=kw["cuts"], sinks=sinks, seq_len=T, steps=nkb + 2 * band)
        kt, vt = kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3)
        if backend == "tpu":
            mk, mv, lse = tpu.far_phases(qf, pos, kt, vt, sched, interpret=interpret, **kw)
        else:
            mk, mv, lse = xla.far_phases(qf, pos, kt, vt, sched, tiles_at_once=_xla_tiles_at_once(FAR), **kw)
    P = len(kw["cuts"])
    # [P, B, Hkv, N, ...] -> [B, n, H, P, ...]
    mk, mv = (x[:, :, :, :n * group].reshape(P, B, hkv, n, group, D).transpose(1, 3, 2, 4, 0, 5)
              .reshape(B, n, H, P, D) for x in (mk, mv))
    lse = lse[:, :, :, :n * group].reshape(P, B, hkv, n, group).transpose(1, 3, 2, 4, 0).reshape(B, n, H, P)
    return mk, mv, lse


def far_statistics(q, k, v, *, window: int, sinks: int, gamma: int, backend: Optional[str] = None,
                   interpret=False, block_sizes: Optional[BlockSizes] = None):
    """Far-key statistics of the `taylor` variant, from one pass over the keys per anchor query.

    The anchors are the sampled rows a * gamma, a < n = ceil(T / gamma). Block j's far keys are
    `[sinks, j gamma - window]`; anchor a serves blocks a - 1, a and a + 1 (as their r + gamma, r and
    r - gamma), whose far ranges are nested prefixes of the keys. So each anchor walks the keys up to
    the longest of its three ranges once, with the online-softmax state saved where each range ends
    (phase p of anchor a: the far keys of block a - 1 + p), accumulating the keys themselves beside
    the values. Returns, per anchor and phase, the mean key and mean value (float32 [B, n, H, 3, D])
    and the log-partition (float32 [B, n, H, 3], -inf over no key).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes, kind="far")
    _check_window(window, sinks)
    _check_gamma(gamma)
    T = q.shape[1]
    return _far(q, k, v, window=int(window), sinks=min(int(sinks), T), gamma=min(int(gamma), T),
                backend=backend, interpret=interpret, bs=bs)


def _check_lengths(lengths, B, T):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [batch={B}], got {lengths.shape}")
    if _is_concrete(lengths) and (np.min(np.asarray(lengths)) < 1 or np.max(np.asarray(lengths)) > T):
        raise ValueError(f"lengths must lie in [1, T={T}], got {np.asarray(lengths).tolist()}")
    return lengths.astype(jnp.int32)


def delta_attention(q, k, v, *, window: int, sinks: int, gamma: Optional[int] = 64, tail: Optional[int] = None,
                    smooth: bool = False, base: str = "window", variant: str = "published", lengths=None,
                    topk: Optional[int] = None, backend: Optional[str] = None, interpret=False,
                    block_sizes: Optional[BlockSizes] = None, rows_block_sizes: Optional[BlockSizes] = None,
                    far_block_sizes: Optional[BlockSizes] = None):
    """Delta Attention (ALGORITHMS.md section 1): a sparse base for every row, exact strided rows
    every `gamma` and an exact tail (default: the authors' `T % gamma + max(128, gamma)` rows per
    sequence, `tail_rows`), combined by `variant` (`correction.CORRECTIONS`: "published" corrects by
    delta = exact - sparse, "recompute" only puts the exact rows in, "taylor" runs the sparse base
    with block-aligned windows and `far_statistics` instead of the strided rows; see `correction`).

    gamma None: no strided rows (variant "recompute" only; with tail 0 the sparse base alone).
    base: "window" (sliding window + sinks) or "topk_blocks" (sinks and local blocks plus the
    `topk` best key blocks per query block by pooled score). lengths int [B]: valid length of
    each right-padded sequence (rows past it hold the sparse value). Returns [B, T, H, D].
    block_sizes / rows_block_sizes / far_block_sizes: the sparse, exact-rows and far kernels'
    tiles (defaults per backend and dtype: `default_block_sizes(backend, head_dim, kind, dtype)`).
    """
    backend, bs = _setup(q, k, v, backend, block_sizes)
    _check_window(window, sinks)
    _check_gamma(gamma)
    B, T = q.shape[:2]
    if variant not in CORRECTIONS:
        raise ValueError(f"variant must be one of {CORRECTIONS}, got {variant!r}")
    if gamma is None and variant != "recompute":
        raise ValueError(f"variant {variant!r} needs gamma")
    if tail is not None and (tail < 0 or tail > T):
        raise ValueError(f"tail must be in [0, T={T}], got {tail}")
    if base not in ("window", "topk_blocks"):
        raise ValueError(f"base must be 'window' or 'topk_blocks', got {base!r}")
    if variant == "taylor" and base != "window":
        raise ValueError(f"variant 'taylor' needs base='window', got base={base!r}")
    lengths = _check_lengths(lengths, B, T)
    kw = dict(backend=backend, interpret=interpret)
    taylor = variant == "taylor"
    if base == "window":
        sparse, lse = sparse_attention(q, k, v, window=window, sinks=sinks, gamma=gamma if taylor else None,
                                       return_lse=True, block_sizes=bs, **kw)
    else:
        if topk is None or topk < 0:
            raise ValueError(f"base='topk_blocks' needs topk >= 0, got {topk}")
        idx, cnt = select_blocks(q, k, block_q=bs.block_q, block_k=bs.block_k, window=min(window, T),
                                 sinks=min(sinks, T), topk=topk)
        sparse, lse = block_sparse_attention(q, k, v, idx, cnt, block_q=bs.block_q, block_k=bs.block_k,
                                             return_lse=True, block_sizes=bs, **kw)
    rows = delta_rows(T, gamma, tail, lengths, batch=B, strided=not taylor)
    exact = jnp.zeros((B, 0) + q.shape[2:], q.dtype)
    exact_lse = None
    if rows.shape[1]:
        exact, exact_lse = exact_rows_attention(q, k, v, rows, return_lse=True,
                                                block_sizes=rows_block_sizes or block_sizes, **kw)
    if not taylor:
        if not rows.shape[1]:
            return sparse
        return delta_correct(sparse, exact, lengths, gamma=gamma, tail=tail, variant=variant, smooth=smooth,
                             sparse_lse=lse, exact_lse=exact_lse)
    g = min(gamma, T)
    if window >= T:
        out = sparse.astype(jnp.float32)
    else:
        far = far_statistics(q, k, v, window=window, sinks=sinks, gamma=g, block_sizes=far_block_sizes, **kw)
        out = taylor_combine(q, sparse, lse, *far, lengths, gamma=g)
    return finish_rows(out, sparse, exact, lengths, g, tail).astype(q.dtype)

"""Kernels for DELTA sparse decoding (Entezari Zarch et al., arXiv 2510.09883).

Per layer, KV cache `k_cache, v_cache: [batch, kv_heads, max_seq, head_dim]` (head-major: a
page of `page_size` tokens of one head is a contiguous [page_size, head_dim] tile), `lengths:
int32 [batch]` valid tokens per sequence (>= 1, the decoded token included), decode query
`q: [batch, q_heads, head_dim]` with q_heads = group * kv_heads. Softmax scale 1/sqrt(head_dim),
float32 accumulation, outputs in q's dtype.

- `decode_attention_with_page_scores`: dense decode attention (full and selection layers) and,
  from the same softmax, the DELTA page scores.
- `select_pages`: top `budget` pages, the last `recent` pages forced in, sorted.
- `sparse_decode_attention`: attention over the selected pages only (sparse layers).

Backends: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic TPU), "xla" (pure JAX); None picks from
`jax.default_backend()` (cpu -> "xla"). `interpret=True` runs the Pallas kernel in interpret
mode (`pltpu.InterpretParams()` for "tpu").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import pick_backend

from . import gpu, tpu, xla
from .common import page_scores_from_token_maxima, token_maxima
from .selection import select

__all__ = [
    "BlockSizes", "default_block_sizes", "decode_attention_with_page_scores", "select_pages",
    "sparse_decode_attention", "page_scores_from_token_maxima",
]

_TARGET_PROGRAMS = 256  # gpu: programs per launch to aim for when choosing splits


def _is_pow2(x):
    return x >= 1 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes.

    block_k: dense kernel, tokens per step (reduced to the largest power of two dividing max_seq;
      on gpu also until num_stages k and v tiles fit in 224 KiB of shared memory).
    pages_per_block: gpu sparse kernel, pages gathered per step (one [pages_per_block *
      page_size, head_dim] tile; capped like block_k).
    num_splits: gpu, sequence (dense) or selection (sparse) splits per (batch, kv head) combined
      flash-decoding style; None chooses about 256 programs per launch.
    num_warps, num_stages: Triton settings (gpu only).
    combine_in_kernel: gpu, merge the splits with a small Pallas kernel (else XLA ops).
    """

    block_k: int = 128
    pages_per_block: int = 8
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2
    combine_in_kernel: bool = True

    def __post_init__(self):
        for name in ("block_k", "pages_per_block"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"{name} must be a positive power of two, got {getattr(self, name)}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")


def default_block_sizes(backend: str, head_dim: int = 128) -> BlockSizes:
    """Defaults per backend (tpu: 512-token tiles; gpu: Triton settings measured on an H100)."""
    if backend == "tpu":
        return BlockSizes(block_k=512)
    if backend == "gpu":
        return BlockSizes(block_k=128 if head_dim >= 128 else 256, pages_per_block=8, num_warps=4,
                          num_stages=2)
    return BlockSizes()




def _check_cache(q, k_cache, v_cache, lengths, page_size):
    for name, x, rank in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("lengths", lengths, 1)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} shapes differ")
    B, hq, D = q.shape
    _, hkv, S, Dk = k_cache.shape
    if k_cache.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"batch mismatch: q {q.shape}, k_cache {k_cache.shape}, lengths {lengths.shape}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q {D}, k_cache {Dk}")
    if hq % hkv:
        raise ValueError(f"q heads {hq} is not a multiple of kv heads {hkv}")
    if int(page_size) < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if S % page_size:
        raise ValueError(f"max_seq {S} is not a multiple of page_size {page_size}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} dtype {x.dtype} unsupported; use float32, bfloat16 or float16")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")


def _setup(q, k_cache, v_cache, lengths, page_size, backend, block_sizes):
    _check_cache(q, k_cache, v_cache, lengths, page_size)
    backend = pick_backend(backend)
    D = q.shape[-1]
    if backend == "gpu":
        if not _is_pow2(D) or D < 16:
            raise ValueError(f"gpu backend needs a power-of-two head_dim >= 16, got {D}")
        if not _is_pow2(page_size):
            raise ValueError(f"gpu backend needs a power-of-two page_size, got {page_size}")
    return backend, block_sizes or default_block_sizes(backend, D)


_SMEM_BYTES = 224 * 1024  # H100: 227 KiB of shared memory per block


def _fit_rows(rows, head_dim, itemsize, num_stages):
    """Caps a gpu k/v tile's rows so that num_stages copies of k and v fit in shared memory."""
    while rows > 16 and rows * head_dim * itemsize * 2 * max(num_stages, 1) > _SMEM_BYTES:
        rows //= 2
    return rows


def _dense_block_k(S, block_k, backend):
    bk = min(block_k, S & -S)  # largest power of two dividing S, capped
    if backend == "gpu" and bk < 16:
        raise ValueError(f"gpu backend needs max_seq divisible by 16, got {S}")
    return bk


def _splits(num_blocks, programs, requested):
    """Largest power of two <= the target that divides num_blocks."""
    target = requested or max(1, _TARGET_PROGRAMS // programs)
    s = 1
    while s * 2 <= min(target, num_blocks) and num_blocks % (s * 2) == 0:
        s *= 2
    return s


@functools.partial(jax.jit, static_argnames=("page_size", "reduce_heads", "backend", "bs", "interpret"))
def _dense(q, k_cache, v_cache, lengths, *, page_size, reduce_heads, backend, bs, interpret):
    B, hq, D = q.shape
    _, hkv, S, _ = k_cache.shape
    G = hq // hkv
    qg = q.reshape(B, hkv, G, D)
    lengths = lengths.astype(jnp.int32)
    bk = _dense_block_k(S, bs.block_k, backend)
    if backend == "gpu":
        bk = _fit_rows(bk, D, k_cache.dtype.itemsize, bs.num_stages)
        splits = _splits(S // bk, B * hkv, bs.num_splits)
        out, lse2, s2 = gpu.dense(qg, k_cache, v_cache, lengths, block_k=bk, num_splits=splits,
                                  num_warps=bs.num_warps, num_stages=bs.num_stages,
                                  combine_in_kernel=bs.combine_in_kernel, interpret=interpret)
        s2 = s2[:, :, :G]
    elif backend == "tpu":
        out, lse2, s2 = tpu.dense(qg, k_cache, v_cache, lengths, block_k=bk, interpret=interpret)
    else:
        out, lse2, s2 = xla.dense(qg, k_cache, v_cache, lengths)
    tmax = token_maxima(s2, lse2, lengths)
    scores = page_scores_from_token_maxima(tmax, page_size) if reduce_heads else tmax
    return out.reshape(B, hq, D), scores


def decode_attention_with_page_scores(q, k_cache, v_cache, lengths, *, page_size: int = 16,
                                      reduce_heads: bool = True, backend: Optional[str] = None,
                                      block_sizes: Optional[BlockSizes] = None, interpret=False):
    """Dense decode attention over tokens < lengths[b], and the DELTA page scores of its softmax.

    q [B, Hq, D], k/v_cache [B, Hkv, S, D], lengths int [B] -> (out [B, Hq, D],
    page_scores float32 [B, S // page_size]) with page_scores[b, p] = sum over the tokens s of
    page p of max over all query heads h of softmax(q_h . k / sqrt(D))[s]; pages past the length
    score 0.

    `reduce_heads=False` returns, instead of the page scores, the per-kv-head per-token maxima
    float32 [B, Hkv, S] (max over the group's query heads; 0 past the length). The page scores are
    `page_scores_from_token_maxima(m, page_size)`: a max over the kv-head axis (a pmax over the
    `model` mesh axis when kv heads are sharded), then a sum within pages. Per-kv-head page sums
    would not do: a sum of maxima is not the maximum of sums.
    """
    backend, bs = _setup(q, k_cache, v_cache, lengths, page_size, backend, block_sizes)
    return _dense(q, k_cache, v_cache, lengths, page_size=int(page_size), reduce_heads=bool(reduce_heads),
                  backend=backend, bs=bs, interpret=interpret)


def select_pages(page_scores, lengths, *, page_size: int, budget: int, recent: int):
    """DELTA page selection.

    page_scores float [B, P], lengths int [B] -> (page_indices int32 [B, budget],
    page_valid bool [B, budget]). Keeps the `budget` best pages among the valid ones (pages
    0 .. ceil(length / page_size) - 1), always including the last `recent` valid pages; ties go to
    the earlier page; the result is in ascending page order. With fewer valid pages than `budget`
    all are taken and the rest is padding: page_valid False, index = the last valid page.
    """
    if page_scores.ndim != 2:
        raise ValueError(f"page_scores must have rank 2 [batch, pages], got shape {page_scores.shape}")
    if lengths.ndim != 1 or lengths.shape[0] != page_scores.shape[0]:
        raise ValueError(f"lengths shape {lengths.shape} does not match page_scores batch "
                         f"{page_scores.shape[0]}")
    if int(page_size) < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if int(recent) < 0:
        raise ValueError(f"recent must be >= 0, got {recent}")
    if int(budget) < 1 or int(budget) < int(recent):
        raise ValueError(f"budget={budget} must be >= 1 and >= recent={recent}")
    return _select(page_scores, lengths, page_size=int(page_size), budget=int(budget), recent=int(recent))


_select = jax.jit(select, static_argnames=("page_size", "budget", "recent"))


@functools.partial(jax.jit, static_argnames=("page_size", "backend", "bs", "interpret"))
def _sparse(q, k_cache, v_cache, page_indices, page_valid, lengths, *, page_size, backend, bs, interpret):
    B, hq, D = q.shape
    _, hkv, S, _ = k_cache.shape
    G = hq // hkv
    qg = q.reshape(B, hkv, G, D)
    lengths = lengths.astype(jnp.int32)
    page_indices = page_indices.astype(jnp.int32)
    page_valid = page_valid.astype(bool)
    if backend == "gpu":
        n = page_indices.shape[1]
        ppb = min(bs.pages_per_block, 1 << max(0, math.ceil(math.log2(n))))
        ppb = max(1, _fit_rows(ppb * page_size, D, k_cache.dtype.itemsize, bs.num_stages) // page_size)
        blocks = -(-n // ppb)
        splits = min(blocks, bs.num_splits or max(1, _TARGET_PROGRAMS // (B * hkv)))
        per_split = -(-blocks // splits)
        splits = -(-blocks // per_split)
        pad = splits * per_split * ppb - n
        if pad:
            page_indices = jnp.pad(page_indices, ((0, 0), (0, pad)), mode="edge")
            page_valid = jnp.pad(page_valid, ((0, 0), (0, pad)))
        out = gpu.sparse(qg, k_cache, v_cache, page_indices, page_valid, lengths, page_size=page_size,
                         pages_per_block=ppb, num_splits=splits, num_warps=bs.num_warps,
                         num_stages=bs.num_stages, combine_in_kernel=bs.combine_in_kernel,
                         interpret=interpret)
    elif backend == "tpu":
        out = tpu.sparse(qg, k_cache, v_cache, page_indices, page_valid, lengths, page_size=page_size,
                         interpret=interpret)
    else:
        out = xla.sparse(qg, k_cache, v_cache, page_indices, page_valid, lengths, page_size=page_size)
    return out.reshape(B, hq, D)


def sparse_decode_attention(q, k_cache, v_cache, page_indices, page_valid, lengths, *,
                            page_size: int = 16, backend: Optional[str] = None,
                            block_sizes: Optional[BlockSizes] = None, interpret=False):
    """Decode attention over the selected pages only, read in place from the full cache.

    q [B, Hq, D], k/v_cache [B, Hkv, S, D], page_indices int [B, n] (page numbers; the valid
    entries distinct, as `select_pages` gives them), page_valid bool [B, n], lengths int [B] ->
    out [B, Hq, D]. Invalid entries and tokens >= lengths[b] are masked.
    """
    backend, bs = _setup(q, k_cache, v_cache, lengths, page_size, backend, block_sizes)
    for name, x in (("page_indices", page_indices), ("page_valid", page_valid)):
        if x.ndim != 2 or x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have shape [batch={q.shape[0]}, n], got {x.shape}")
    if page_indices.shape != page_valid.shape:
        raise ValueError(f"page_indices {page_indices.shape} and page_valid {page_valid.shape} differ")
    if page_indices.shape[1] < 1:
        raise ValueError("page_indices must select at least one page slot")
    return _sparse(q, k_cache, v_cache, page_indices, page_valid, lengths, page_size=int(page_size),
                   backend=backend, bs=bs, interpret=interpret)

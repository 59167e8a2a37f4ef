"""Kernels for DELTA sparse decoding (Entezari Zarch et al., arXiv 2510.09883) over a paged KV cache.

Per layer, a pool of pages `k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim]` (the
layout of jax's Pallas `paged_attention`) and per sequence a page table `page_table: int
[batch, pages_per_seq]`: logical page i of sequence b (tokens i * page_size .. (i + 1) * page_size
- 1) lives in physical page `page_table[b, i]`. Entries at or past ceil(lengths[b] / page_size)
may hold any in-range value and are never read into a result. `lengths: int [batch]` valid tokens
(0: an empty slot, output 0); decode query `q: [batch, q_heads, head_dim]` with q_heads = group *
kv_heads (`kv_heads` is the local count when the pool is sharded by heads). Softmax scale
1/sqrt(head_dim), float32 accumulation, outputs in q's dtype. DELTA's page is the pool's page.

- `paged_decode_attention`: dense decode attention (full and selection layers), with the DELTA
  page scores (or per-kv-head token maxima) of the same softmax when asked.
- `select_pages`: top `budget` logical pages, the last `recent` pages forced in, sorted.
- `paged_sparse_decode_attention`: attention over the selected logical pages only.

Backends: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic TPU), "xla" (pure JAX); None picks from
`jax.default_backend()` (cpu -> "xla"). `interpret=True` runs the Pallas kernel in interpret
mode (`pltpu.InterpretParams()` for "tpu").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import pick_backend

from . import gpu, tpu, xla
from .common import page_scores_from_token_maxima, token_maxima
from .selection import TOPK_CHUNK, select

__all__ = [
    "BlockSizes", "default_block_sizes", "paged_decode_attention", "select_pages",
    "paged_sparse_decode_attention", "page_scores_from_token_maxima",
]

SCORES = (None, "pages", "tokens")
_TARGET_PROGRAMS = 256  # gpu: programs per launch to aim for when choosing splits
_MAX_BLOCKS_PER_SPLIT = 8  # gpu dense: blocks of a full-length row per split, at most about this many
_MAX_SPLITS = 32  # gpu dense: the most splits `max_blocks` asks for (what one row alone gets from the target)


def _is_pow2(x):
    return x >= 1 and not x & (x - 1)


def _pow2_floor(x):
    """The largest power of two <= x, at least 1."""
    return 1 << max(0, int(x).bit_length() - 1)


def _cdiv(a, b):
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes.

    pages_per_block: pages gathered through the page table per step (one [pages_per_block *
      page_size, head_dim] tile of k and of v).
    num_splits: gpu, sequence (dense) or selection (sparse) splits per (batch, kv head) combined
      flash-decoding style; None chooses about 256 programs per launch.
    num_warps, num_stages: Triton settings (gpu only).
    combine_in_kernel: gpu, merge the splits with a small Pallas kernel (else XLA ops).
    """

    pages_per_block: int = 8
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2
    combine_in_kernel: bool = True

    def __post_init__(self):
        if not _is_pow2(self.pages_per_block):
            raise ValueError(f"pages_per_block must be a positive power of two, got {self.pages_per_block}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps} and num_stages={self.num_stages} must be >= 1")


def default_block_sizes(backend: str, head_dim: int = 128, dtype=jnp.bfloat16, page_size: int = 16,
                        group: int = 1) -> BlockSizes:
    """Defaults per backend. gpu: the H100-tuned bf16 tiles (128 tokens per step at head_dim >=
    128, else 256; 4 warps, 2 stages), halved until `gpu.smem_bytes` fits `gpu.SMEM_BYTES`;
    tpu: 256 tokens per step."""
    if backend == "tpu":
        return BlockSizes(pages_per_block=_pow2_floor(256 // page_size))
    if backend != "gpu":
        return BlockSizes()
    itemsize = jnp.dtype(dtype).itemsize
    ppb, stages = _pow2_floor((128 if head_dim >= 128 else 256) // page_size), 2
    while ppb > 1 and ppb * page_size > 16 and gpu.smem_bytes(
            ppb * page_size, group, head_dim, itemsize, stages) > gpu.SMEM_BYTES:
        ppb //= 2
    if gpu.smem_bytes(ppb * page_size, group, head_dim, itemsize, stages) > gpu.SMEM_BYTES:
        stages = 1
    return BlockSizes(pages_per_block=ppb, num_warps=4, num_stages=stages)


def _check(q, k_pages, v_pages, page_table, lengths):
    for name, x, rank in (("q", q, 3), ("k_pages", k_pages, 4), ("v_pages", v_pages, 4),
                          ("page_table", page_table, 2), ("lengths", lengths, 1)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} shapes differ")
    B, hq, D = q.shape
    hkv, _, _, Dk = k_pages.shape
    if page_table.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"batch mismatch: q {q.shape}, page_table {page_table.shape}, lengths {lengths.shape}")
    if page_table.shape[1] < 1:
        raise ValueError(f"page_table must have at least one page per sequence, got shape {page_table.shape}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q {D}, k_pages {Dk}")
    if hq % hkv:
        raise ValueError(f"q heads {hq} is not a multiple of kv heads {hkv}")
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} dtype {x.dtype} unsupported; use float32, bfloat16 or float16")
    for name, x in (("page_table", page_table), ("lengths", lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {x.dtype}")


def _setup(q, k_pages, v_pages, page_table, lengths, backend, block_sizes):
    """Checks the arguments; -> (backend, block sizes)."""
    _check(q, k_pages, v_pages, page_table, lengths)
    backend = pick_backend(backend)
    D, page_size, group = q.shape[-1], k_pages.shape[2], q.shape[1] // k_pages.shape[0]
    if backend == "gpu":
        if not _is_pow2(D) or D < 16:
            raise ValueError(f"gpu backend needs a power-of-two head_dim >= 16, got {D}")
        if not _is_pow2(page_size):
            raise ValueError(f"gpu backend needs a power-of-two page_size, got {page_size}")
    bs = block_sizes or default_block_sizes(backend, D, k_pages.dtype, page_size, group)
    if backend == "gpu":
        if bs.pages_per_block * page_size < 16:
            raise ValueError(f"gpu backend needs pages_per_block * page_size >= 16, got "
                             f"{bs.pages_per_block} * {page_size}")
        need = gpu.smem_bytes(bs.pages_per_block * page_size, group, D, k_pages.dtype.itemsize, bs.num_stages)
        if need > gpu.SMEM_BYTES:
            raise ValueError(f"gpu tiles need {need} bytes of shared memory (pages_per_block="
                             f"{bs.pages_per_block}, page_size={page_size}, head_dim={D}, {k_pages.dtype}, "
                             f"num_stages={bs.num_stages}), more than {gpu.SMEM_BYTES}")
    return backend, bs


def _splits(num_blocks, programs, requested, max_blocks=None):
    """Splits of num_blocks per program: `requested`, else the largest power of two <= about
    _TARGET_PROGRAMS / programs and, with `max_blocks`, <= about num_blocks / max_blocks (whichever
    is more, the latter at most _MAX_SPLITS); at most num_blocks. `max_blocks` bounds the work of one
    program of a full-length row: in a batch of rows of unequal lengths the longest rows' programs set
    the time, and more splits spread them over more of the GPU (a row's splits past its length exit at
    once; H100, 8 rows of 32K/16K/8K/8K tokens: 0.48 ms with 4 splits, 0.30 with 32)."""
    if requested:
        return min(requested, num_blocks)
    want = max(1, _TARGET_PROGRAMS // programs, min(_cdiv(num_blocks, max_blocks), _MAX_SPLITS) if max_blocks else 1)
    s = 1
    while s * 2 <= min(want, num_blocks):
        s *= 2
    return s


def _gpu_pages_per_block(bs, num_pages, page_size):
    """The block's pages, not above the table's (rounded to a power of two) nor below 16 tokens."""
    return max(min(bs.pages_per_block, 1 << max(0, (num_pages - 1).bit_length())), _cdiv(16, page_size))


@functools.partial(jax.jit, static_argnames=("scores", "backend", "bs", "interpret"))
def _dense(q, k_pages, v_pages, page_table, lengths, *, scores, backend, bs, interpret):
    B, hq, D = q.shape
    hkv, _, page_size, _ = k_pages.shape
    pps = page_table.shape[1]
    qg = q.reshape(B, hkv, hq // hkv, D)
    page_table = page_table.astype(jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, pps * page_size)
    logits = scores is not None
    if backend == "gpu":
        ppb = _gpu_pages_per_block(bs, pps, page_size)
        splits = _splits(_cdiv(pps, ppb), B * hkv, bs.num_splits, _MAX_BLOCKS_PER_SPLIT)
        out, lse2, s2 = gpu.dense(qg, k_pages, v_pages, page_table, lengths, pages_per_block=ppb,
                                  num_splits=splits, num_warps=bs.num_warps, num_stages=bs.num_stages,
                                  combine_in_kernel=bs.combine_in_kernel, logits=logits,
                                  interpret=interpret)
    elif backend == "tpu":
        out, lse2, s2 = tpu.dense(qg, k_pages, v_pages, page_table, lengths,
                                  pages_per_block=min(bs.pages_per_block, pps), logits=logits,
                                  interpret=interpret)
    else:
        out, lse2, s2 = xla.dense(qg, k_pages, v_pages, page_table, lengths)
    out = out.reshape(B, hq, D)
    if not logits:
        return out
    tmax = token_maxima(s2, lse2, lengths)
    return out, (page_scores_from_token_maxima(tmax, page_size) if scores == "pages" else tmax)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scores: Optional[str] = None,
                           backend: Optional[str] = None, block_sizes: Optional[BlockSizes] = None,
                           interpret=False):
    """Dense decode attention over the tokens < lengths[b] of each sequence's pages.

    q [B, Hq, D], k/v_pages [Hkv, P, page_size, D], page_table int [B, pages_per_seq],
    lengths int [B] (clipped to pages_per_seq * page_size) -> out [B, Hq, D], and with
    - scores="pages": (out, page_scores float32 [B, pages_per_seq]), page_scores[b, i] = sum over
      the tokens s of logical page i of max over all query heads h of softmax(q_h . k / sqrt(D))[s]
      (pages past the length score 0);
    - scores="tokens": (out, token_max float32 [B, Hkv, pages_per_seq * page_size]), the per-kv-head
      token maxima (max over the group's query heads; 0 past the length). The page scores are
      `page_scores_from_token_maxima(token_max, page_size)`: a max over the kv-head axis (a pmax
      over the `model` mesh axis first when kv heads are sharded), then a sum within pages.
    """
    if scores not in SCORES:
        raise ValueError(f"scores must be None, 'pages' or 'tokens', got {scores!r}")
    backend, bs = _setup(q, k_pages, v_pages, page_table, lengths, backend, block_sizes)
    return _dense(q, k_pages, v_pages, page_table, lengths, scores=scores, backend=backend, bs=bs,
                  interpret=interpret)


def select_pages(page_scores, lengths, *, page_size: int, budget: int, recent: int,
                 topk_chunk: int = TOPK_CHUNK):
    """DELTA page selection.

    page_scores float [B, P], lengths int [B] -> (page_indices int32 [B, budget],
    page_valid bool [B, budget]), logical page numbers. Keeps the `budget` best pages among the
    valid ones (pages 0 .. ceil(length / page_size) - 1), always including the last `recent` valid
    pages; ties go to the earlier page; the result is in ascending page order. With fewer valid
    pages than `budget` all are taken and the rest is padding: page_valid False, index = the last
    valid page (0 for an empty slot). `topk_chunk`: pages per first-stage top-k when there are more
    (`selection.top_indices`; 0: one top-k over all pages); the result does not depend on it.
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
    if int(topk_chunk) < 0:
        raise ValueError(f"topk_chunk must be >= 0, got {topk_chunk}")
    return _select(page_scores, lengths, page_size=int(page_size), budget=int(budget), recent=int(recent),
                   topk_chunk=int(topk_chunk))


_select = jax.jit(select, static_argnames=("page_size", "budget", "recent", "topk_chunk"))


@functools.partial(jax.jit, static_argnames=("backend", "bs", "interpret"))
def _sparse(q, k_pages, v_pages, page_table, page_indices, page_valid, lengths, *, backend, bs, interpret):
    B, hq, D = q.shape
    hkv, _, page_size, _ = k_pages.shape
    pps = page_table.shape[1]
    qg = q.reshape(B, hkv, hq // hkv, D)
    page_table = page_table.astype(jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, pps * page_size)
    page_valid = page_valid.astype(bool)
    # Logical pages in range; -1 marks an entry not to read.
    sel = jnp.where(page_valid, jnp.clip(page_indices.astype(jnp.int32), 0, pps - 1), -1)
    n = sel.shape[1]
    if backend == "gpu":
        ppb = _gpu_pages_per_block(bs, n, page_size)
        blocks = _cdiv(n, ppb)
        splits = _splits(blocks, B * hkv, bs.num_splits)
        per_split = _cdiv(blocks, splits)
        splits = _cdiv(blocks, per_split)
        sel = jnp.pad(sel, ((0, 0), (0, splits * per_split * ppb - n)), constant_values=-1)
        out = gpu.sparse(qg, k_pages, v_pages, page_table, sel, lengths, pages_per_block=ppb,
                         num_splits=splits, num_warps=bs.num_warps, num_stages=bs.num_stages,
                         combine_in_kernel=bs.combine_in_kernel, interpret=interpret)
    elif backend == "tpu":
        ppb = min(bs.pages_per_block, n)
        sel = jnp.pad(sel, ((0, 0), (0, _cdiv(n, ppb) * ppb - n)), constant_values=-1)
        out = tpu.sparse(qg, k_pages, v_pages, page_table, sel, lengths, pages_per_block=ppb,
                         interpret=interpret)
    else:
        out = xla.sparse(qg, k_pages, v_pages, page_table, jnp.maximum(sel, 0), sel >= 0, lengths)
    return out.reshape(B, hq, D)


def paged_sparse_decode_attention(q, k_pages, v_pages, page_table, page_indices, page_valid, lengths, *,
                                  backend: Optional[str] = None, block_sizes: Optional[BlockSizes] = None,
                                  interpret=False):
    """Decode attention over the selected logical pages only, read in place from the pool.

    q [B, Hq, D], k/v_pages [Hkv, P, page_size, D], page_table int [B, pages_per_seq],
    page_indices int [B, n] (logical page numbers, mapped through page_table; the valid entries
    distinct, as `select_pages` gives them), page_valid bool [B, n], lengths int [B] ->
    out [B, Hq, D]. Invalid entries and tokens >= lengths[b] are masked.
    """
    backend, bs = _setup(q, k_pages, v_pages, page_table, lengths, backend, block_sizes)
    for name, x in (("page_indices", page_indices), ("page_valid", page_valid)):
        if x.ndim != 2 or x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have shape [batch={q.shape[0]}, n], got {x.shape}")
    if page_indices.shape != page_valid.shape:
        raise ValueError(f"page_indices {page_indices.shape} and page_valid {page_valid.shape} differ")
    if page_indices.shape[1] < 1:
        raise ValueError("page_indices must select at least one page slot")
    if not jnp.issubdtype(page_indices.dtype, jnp.integer):
        raise ValueError(f"page_indices must be integers, got dtype {page_indices.dtype}")
    return _sparse(q, k_pages, v_pages, page_table, page_indices, page_valid, lengths, backend=backend,
                   bs=bs, interpret=interpret)

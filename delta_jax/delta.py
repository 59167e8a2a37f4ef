"""The sparse methods inside the model: Delta Attention prefill and DELTA decode.

Prefill rows are right-padded with per-sequence `lengths [b]`. The kernel package
(`pallas_kernels.sparse_prefill`) owns the sparse base, the exact rows, the tail rule and every
correction; this module maps a `PrefillConfig` onto it and runs it per head shard under a mesh.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from delta_jax import cache, sharding
from delta_jax.config import DecodeConfig, PrefillConfig
from pallas_kernels import delta_decode as dk
from pallas_kernels import sparse_prefill as pk

# Kernel backend for the sparse methods: None picks Pallas on GPU/TPU and XLA on the CPU;
# DELTA_JAX_KERNEL_BACKEND=xla forces the blockwise XLA path (fast to compile, same numerics).
KERNEL_BACKEND = os.environ.get("DELTA_JAX_KERNEL_BACKEND") or None


@contextlib.contextmanager
def kernel_backend(backend: Optional[str]):
    """Runs the block with the sparse methods' kernel backend set to `backend` (part of every compile key),
    restoring the previous one after."""
    global KERNEL_BACKEND
    previous, KERNEL_BACKEND = KERNEL_BACKEND, backend
    try:
        yield
    finally:
        KERNEL_BACKEND = previous


def _head_axis(kv_heads: int, batch: int):
    """The mesh, its head axis name and batch axis name when running per head shard, else None."""
    mesh = sharding.current_mesh()
    if not sharding.heads_divide(kv_heads, mesh):
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
    t = q.shape[1]
    return pk.delta_attention(
        q, k, v, window=min(method.window, t), sinks=min(method.sinks, t), gamma=method.gamma,
        tail=None if method.tail is None else min(method.tail, t), smooth=method.smooth, base=method.base,
        variant="recompute" if method.method == "window" else method.variant, lengths=lengths,
        topk=method.topk, backend=KERNEL_BACKEND)


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

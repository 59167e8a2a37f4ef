"""The one attention interface per phase that the model calls.

Prefill: `dense | window | delta` over q `[b, T, H, D]`, k/v `[b, T, KVH, D]`, right-padded with
per-sequence `lengths [b]`, and the write of the prompt's keys and values into its pages. Decode:
`dense | delta` over the paged KV cache (`delta_jax.cache`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from delta_jax import cache, sharding
from delta_jax.config import DecodeConfig, PrefillConfig
from pallas_kernels import delta_decode as dk


# ----------------------------------------------------------------------------------------- prefill

def prefill(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
            method: PrefillConfig) -> jax.Array:
    """Causal prefill attention `[b, T, H, D]` with the configured method."""
    if method.method == "dense":
        return dense_prefill(q, k, v)
    from delta_jax import delta  # the sparse methods live beside their kernels' glue
    return delta.sparse_prefill(q, k, v, lengths, method)


def dense_prefill(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact causal attention: cuDNN for bf16 on the GPU, else the sparse-prefill kernels with a
    window covering the prompt (the Pallas flash kernel on GPU/TPU, its blockwise XLA twin on the
    CPU, whose scores are never larger than a query tile by a key block)."""
    if jax.default_backend() == "gpu" and q.dtype != jnp.float32:
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except Exception:  # shapes cuDNN does not take: the Pallas kernel below
            pass
    from delta_jax.delta import KERNEL_BACKEND
    from pallas_kernels import sparse_prefill as pk
    return pk.sparse_attention(q, k, v, window=q.shape[1], sinks=0, backend=KERNEL_BACKEND)


# ------------------------------------------------------------------------------------------ cache

def _axes(kv_heads: int):
    """Under the current mesh: (mesh, model axis name or None when the heads are replicated), else None."""
    mesh = sharding.current_mesh()
    if mesh is None:
        return None
    return mesh, ("model" if sharding.heads_divide(kv_heads, mesh) else None)


def write_prompt(layer, k: jax.Array, v: jax.Array, page_table: jax.Array, row_shard: jax.Array):
    """Writes a prompt's keys and values `[b, T, KVH, D]` into the rows' pages; returns the layer's pages.

    `row_shard [b]`: the data shard whose pages the row uses (the prompt rows are not split over `data`)."""
    axes = _axes(k.shape[2])

    def write(layer, k, v, page_table, row_shard):
        here = 0 if axes is None else jax.lax.axis_index("data")
        owned = row_shard == here
        return (cache.write_prompt(layer[0], k, page_table, owned),
                cache.write_prompt(layer[1], v, page_table, owned))

    if axes is None:
        return write(layer, k, v, page_table, row_shard)
    mesh, model = axes
    pool, rows = P(model, "data", None, None), P(None, None, model, None)
    return sharding.shard_map(write, mesh, in_specs=((pool, pool), rows, rows, P(), P()),
                              out_specs=(pool, pool))(layer, k, v, page_table, row_shard)


# ----------------------------------------------------------------------------------------- decode

def decode(q: jax.Array, k_new: jax.Array, v_new: jax.Array, layer, page_table: jax.Array, positions: jax.Array,
           active: jax.Array, role: str, selection: Optional[tuple], method: DecodeConfig):
    """One layer's decode step: appends this token's key and value `[b, KVH, D]` at `positions [b]`, then
    attends q `[b, H, D]` by the layer's role ('full', 'selection', 'sparse').

    Returns (out `[b, H, D]`, the layer's pages, selection): the selection (logical page indices and
    validity `[b, budget]`) is what the sparse layers after a selection layer read. Under a mesh the
    step runs per shard (`shard_map`): rows and pages over `data`, kv heads over `model` when it divides them.
    """
    axes = _axes(k_new.shape[1])
    if axes is None:
        return _decode(q, k_new, v_new, layer, page_table, positions, active, selection, role=role,
                       method=method, axis=None)
    mesh, model = axes
    heads, pool, rows = P("data", model, None), P(model, "data", None, None), P("data")
    sel = None if selection is None else (P("data", None), P("data", None))
    fn = sharding.shard_map(functools.partial(_decode, role=role, method=method, axis=model), mesh,
                            in_specs=(heads, heads, heads, (pool, pool), P("data", None), rows, rows, sel),
                            out_specs=(heads, (pool, pool), (P("data", None), P("data", None))))
    return fn(q, k_new, v_new, layer, page_table, positions, active, selection)


def _decode(q, k_new, v_new, layer, page_table, positions, active, selection, *, role, method, axis):
    from delta_jax import delta
    kp = cache.write_token(layer[0], k_new, page_table, positions, active)
    vp = cache.write_token(layer[1], v_new, page_table, positions, active)
    lengths = jnp.where(active, positions + 1, 0)
    if role == "full":
        out = dk.paged_decode_attention(q, kp, vp, page_table, lengths, backend=delta.KERNEL_BACKEND)
        if selection is None:
            b = q.shape[0]
            selection = (jnp.zeros((b, method.budget), jnp.int32), jnp.zeros((b, method.budget), bool))
        return out, (kp, vp), selection
    out, selection = delta.delta_decode(q, kp, vp, page_table, lengths, role, selection, method, axis)
    return out, (kp, vp), selection

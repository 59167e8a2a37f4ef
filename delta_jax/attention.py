"""The one attention interface per phase that the model calls.

Prefill: `dense | window | delta` over q `[b, T, H, D]`, k/v `[b, T, KVH, D]`, right-padded with
per-sequence `lengths [b]`. Decode: `dense | delta` over the KV cache `[b, KVH, S, D]`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from delta_jax.config import DecodeConfig, PrefillConfig


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

def cache_from_prefill(k: jax.Array, v: jax.Array, cache_len: int):
    """Prefill keys/values `[b, T, KVH, D]` -> cache pair `[b, KVH, cache_len, D]`."""
    t = k.shape[1]
    pad = ((0, 0), (0, 0), (0, cache_len - t), (0, 0))
    return (jnp.pad(jnp.swapaxes(k, 1, 2), pad), jnp.pad(jnp.swapaxes(v, 1, 2), pad))


def cache_append(cache, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    """Writes one token's k/v `[b, KVH, D]` at per-sequence `positions [b]`."""
    kc, vc = cache

    def put(c, x, p):
        return jax.lax.dynamic_update_slice(c, x[:, None, :].astype(c.dtype), (0, p, 0))

    return jax.vmap(put)(kc, k_new, positions), jax.vmap(put)(vc, v_new, positions)


# ----------------------------------------------------------------------------------------- decode

def dense_decode(q: jax.Array, kc: jax.Array, vc: jax.Array, lengths: jax.Array) -> jax.Array:
    """Decode attention over the valid cache. q `[b, H, D]`, cache `[b, KVH, S, D]` -> `[b, H, D]`."""
    b, h, d = q.shape
    kvh, s = kc.shape[1], kc.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d)
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    sc = jnp.einsum("bkgd,bksd->bkgs", qg, kc, precision=prec,
                    preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    valid = jnp.arange(s)[None, :] < lengths[:, None]
    sc = jnp.where(valid[:, None, None, :], sc, -jnp.inf)
    p = jax.nn.softmax(sc, axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", p.astype(vc.dtype), vc, precision=prec,
                   preferred_element_type=jnp.float32)
    return o.reshape(b, h, d).astype(q.dtype)


def pallas_dense_decode(q: jax.Array, kc: jax.Array, vc: jax.Array, lengths: jax.Array) -> jax.Array:
    """Dense decode through jax's Pallas GPU kernel (interpret mode off the GPU)."""
    from jax.experimental.pallas.ops.gpu import decode_attention as jd
    # gqa takes [b, S, KVH, D] and swaps to head-major itself: the two transposes cancel under jit
    return jd.gqa(q, jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vc, 1, 2), kv_seq_len=lengths,
                  interpret=jax.default_backend() != "gpu")


def decode(q: jax.Array, kc: jax.Array, vc: jax.Array, lengths: jax.Array, role: str,
           selection: Optional[tuple], method: DecodeConfig):
    """One layer's decode attention by its role ('full', 'selection', 'sparse').

    Returns (out `[b, H, D]`, selection), the selection being what sparse layers read.
    """
    if role == "full":
        if method.kernel == "pallas":
            return pallas_dense_decode(q, kc, vc, lengths), selection
        return dense_decode(q, kc, vc, lengths), selection
    from delta_jax import delta
    return delta.delta_decode(q, kc, vc, lengths, role, selection, method)

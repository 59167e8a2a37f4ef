"""Which key blocks each query tile visits, shared by the XLA and TPU paths.

A schedule is given per (batch, kv_head, query tile) either as ranges or as a list:
- `Ranges(sink_blocks, lo, hi)`: the blocks `[0, sink_blocks)` then `[lo, hi)`.
- `Listed(indices, counts)`: the first `counts` entries of `indices` (padded, any value after).
`steps` is the static number of steps every tile is given (the largest count).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
FAR = 1 << 30  # a window larger than any sequence: dense causal attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ranges:
    sink_blocks: jax.Array  # int32 [B, Hkv, nQ]
    lo: jax.Array
    hi: jax.Array
    steps: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Listed:
    indices: jax.Array  # int32 [B, Hkv, nQ, L]
    counts: jax.Array  # int32 [B, Hkv, nQ]
    steps: int = dataclasses.field(metadata=dict(static=True))


def tile_bounds(pos, block_rows):
    """Smallest and largest position of each tile: pos [B, N] -> two [B, N // block_rows]."""
    p = pos.reshape(pos.shape[0], -1, block_rows)
    return p.min(-1), p.max(-1)


def window_ranges(pos, kv_heads, *, block_rows, block_k, num_k_blocks, window, sinks, steps):
    """Ranges covering `t - window < s <= t` or `s < sinks` for the rows of each tile."""
    tmin, tmax = tile_bounds(pos, block_rows)
    lo = jnp.maximum(tmin - window + 1, 0) // block_k
    hi = jnp.minimum(tmax // block_k + 1, num_k_blocks)
    lo = jnp.minimum(lo, hi)
    sink_blocks = jnp.minimum(-(-sinks // block_k), lo)
    b = lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], kv_heads, x.shape[1])).astype(jnp.int32)
    return Ranges(b(sink_blocks), b(lo), b(hi), steps)


def window_steps(block_rows_positions, *, block_k, num_k_blocks, window, sinks):
    """Largest number of key blocks a tile of contiguous positions needs."""
    band = -(-(window - 1 + block_rows_positions) // block_k) + 1
    return int(min(num_k_blocks, band + -(-sinks // block_k)))


def valid_mask(t, s, window, sinks):
    """Causal, and inside the window or a sink column. t [..., 1], s [1, ...]."""
    keep = s <= t
    if window is not None and window < FAR:
        near = t - s < window
        if sinks:
            near = near | (s < sinks)
        keep = keep & near
    return keep

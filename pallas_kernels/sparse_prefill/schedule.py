"""Which keys each query row attends and which key blocks each query tile visits, shared by the
GPU, TPU and XLA bodies.

Row masks:
- window + sinks (`valid_mask`): row t attends s <= t with `start(t) - s < window` or `s < sinks`,
  where start(t) = t, or with `gamma` the first row of t's block of gamma rows (the `taylor`
  variant's local keys: the window of the block's sampled row plus the band up to t);
- far phases (`phase_bounds`): phase i of row t attends `lower_i < s <= upper_i` (the far keys
  of Delta's `taylor` variant, split at the cut offsets so that each phase ends where a block's
  far range ends).

A schedule is given per (batch, kv_head, query tile) as ranges, a list or phases:
- `Ranges(sink_blocks, lo, hi)`: the blocks `[0, sink_blocks)` then `[lo, hi)`.
- `Listed(indices, counts)`: the first `counts` entries of `indices` (padded, any value after).
- `Phases(lo, hi)`: `[lo[p], hi[p])` for each phase p in turn, with the phase's own mask.
`steps` is the static number of steps every tile is given (the largest count).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Phases:
    lo: jax.Array  # int32 [B, Hkv, nQ, P]
    hi: jax.Array
    steps: int = dataclasses.field(metadata=dict(static=True))


def div(a, b):
    """Integer division of non-negative int32 values (a plain division in every lowering)."""
    return lax.div(a, jnp.int32(b))


def block_start(t, gamma):
    """First row of t's block of `gamma` rows (t itself when gamma is None)."""
    return t if gamma is None else t - lax.rem(t, jnp.int32(gamma))


def tile_bounds(pos, block_rows):
    """Smallest and largest position of each tile: pos [B, N] -> two [B, N // block_rows]."""
    p = pos.reshape(pos.shape[0], -1, block_rows)
    return p.min(-1), p.max(-1)


def _per_head(x, kv_heads):
    return jnp.broadcast_to(x[:, None], (x.shape[0], kv_heads) + x.shape[1:]).astype(jnp.int32)


def window_ranges(pos, kv_heads, *, block_rows, block_k, num_k_blocks, window, sinks, steps, gamma=None):
    """Ranges covering `start(t) - window < s <= t` or `s < sinks` for the rows of each tile."""
    tmin, tmax = tile_bounds(pos, block_rows)
    lo = div(jnp.maximum(block_start(tmin, gamma) - window + 1, 0), block_k)
    hi = jnp.minimum(div(tmax, block_k) + 1, num_k_blocks)
    lo = jnp.minimum(lo, hi)
    sink_blocks = jnp.minimum(-(-sinks // block_k), lo)
    return Ranges(_per_head(sink_blocks, kv_heads), _per_head(lo, kv_heads), _per_head(hi, kv_heads), steps)


def window_steps(block_rows_positions, *, block_k, num_k_blocks, window, sinks, gamma=None):
    """Largest number of key blocks a tile of contiguous positions needs."""
    band = -(-(window - 1 + block_rows_positions + (gamma - 1 if gamma else 0)) // block_k) + 1
    return int(min(num_k_blocks, band + -(-sinks // block_k)))


def valid_mask(t, s, window, sinks, gamma=None):
    """Causal, and inside the (block-aligned with gamma) window or a sink column. t [..., 1], s [1, ...]."""
    keep = s <= t
    if window is not None and window < FAR:
        near = block_start(t, gamma) - s < window
        if sinks:
            near = near | (s < sinks)
        keep = keep & near
    return keep


def phase_bounds(t, phase, cuts, sinks, seq_len):
    """Keys `lower < s <= upper` of `phase` for rows at positions t: phase 0 starts at the sinks,
    phase p ends at t + cuts[p]; keys stop at seq_len - 1."""
    lower = sinks - 1 if phase == 0 else jnp.maximum(t + cuts[phase - 1], sinks - 1)
    upper = jnp.minimum(t + cuts[phase], seq_len - 1)
    return lower, upper


def phase_ranges(pos, kv_heads, *, block_rows, block_k, num_k_blocks, cuts, sinks, seq_len, steps):
    """The key blocks of every phase for the rows of each tile."""
    tmin, tmax = tile_bounds(pos, block_rows)
    los, his = [], []
    for p in range(len(cuts)):
        lower, _ = phase_bounds(tmin, p, cuts, sinks, seq_len)
        _, upper = phase_bounds(tmax, p, cuts, sinks, seq_len)
        lo = jnp.clip(div(jnp.maximum(lower + 1, 0), block_k), 0, num_k_blocks)
        hi = jnp.where(upper >= lower + 1, jnp.clip(div(jnp.maximum(upper, 0), block_k) + 1, 0, num_k_blocks), lo)
        los.append(jnp.broadcast_to(lo, tmin.shape))
        his.append(jnp.broadcast_to(jnp.maximum(hi, lo), tmin.shape))
    return Phases(_per_head(jnp.stack(los, -1), kv_heads), _per_head(jnp.stack(his, -1), kv_heads), steps)

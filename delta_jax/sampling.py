"""Token sampling on the device: greedy, temperature and nucleus (top-p), per row.

Each row has its own temperature, top-p and key, so a request samples the same tokens whatever else
is in the batch. The host picks the code a batch needs (`mode`): greedy batches never sort, and the
vocabulary is sorted only when some row has top_p < 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """Per-row keys `[b, 2]` for the token number `counts [b]` of each row's request seeded `seeds [b]`."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts)


def mode(temperature, top_p) -> str:
    """The sampling code a batch needs: "greedy" (every temperature 0), "sample" (some temperature > 0, no
    top-p cut) or "nucleus" (a top-p cut). Chosen on the host, so the device runs no branch per step."""
    t, p = np.asarray(temperature), np.asarray(top_p)
    if not np.any(t > 0):
        return "greedy"
    return "nucleus" if np.any((p < 1) & (t > 0)) else "sample"


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           how: str = "nucleus") -> jax.Array:
    """Next tokens `int32 [b]` from logits `[b, vocab]` with per-row keys `[b, 2]`, temperature `[b]`
    (0: greedy) and top_p `[b]` (1: no nucleus cut); `how` (see `mode`) is the most any row needs."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if how == "greedy":
        return greedy
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    if how == "sample":
        picked = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    else:
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, -1)
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        pick = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
        picked = jnp.take_along_axis(order, pick[:, None], -1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, picked, greedy)

"""Token sampling on the device: greedy, temperature and nucleus (top-p), per row.

Each row has its own temperature, top-p and key, so a request samples the same tokens whatever else
is in the batch. Greedy rows never sort: the vocabulary is sorted only when some row has top_p < 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """Per-row keys `[b, 2]` for the token number `counts [b]` of each row's request seeded `seeds [b]`."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens `int32 [b]` from logits `[b, vocab]` with per-row keys `[b, 2]`, temperature `[b]`
    (0: greedy) and top_p `[b]` (1: no nucleus cut)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]

        def nucleus(_):
            order = jnp.argsort(-scaled, axis=-1)
            ranked = jnp.take_along_axis(scaled, order, -1)
            probs = jax.nn.softmax(ranked, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
            pick = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
            return jnp.take_along_axis(order, pick[:, None], -1)[:, 0].astype(jnp.int32)

        def plain(_):
            return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

        cut = jnp.any((top_p < 1) & (temperature > 0))
        return jnp.where(temperature > 0, jax.lax.cond(cut, nucleus, plain, None), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda _: greedy, None)

"""Test helper: one prompt prefilled into a fresh paged cache whose pages are shuffled (fragmented)."""

import jax.numpy as jnp
import numpy as np

from delta_jax import cache
from delta_jax.cache import CacheSpec


def prefill_into_pages(model, prompt, method, *, page_size=16, extra=16, seed=0):
    """Returns (logits of the last prompt position, pages, page_table [1, W]) with the prompt's keys and values
    written through a page table over a shuffled pool."""
    n = len(prompt)
    width = cache.pages_for(n + extra, page_size)
    spec = CacheSpec.for_model(model.cfg, page_size=page_size, num_pages=2 * width + 1, pages_per_seq=width, slots=1,
                               dtype=jnp.dtype(model.dtype).name)
    pages = cache.empty_pool(spec)
    order = np.random.default_rng(seed).permutation(np.arange(1, spec.num_pages))[:width]
    table = jnp.asarray(order[None].astype(np.int32))
    t = -(-n // 128) * 128
    tokens = jnp.asarray(np.pad(prompt, (0, t - n))[None], jnp.int32)
    h, pages, _ = model.prefill(tokens, jnp.asarray([n], jnp.int32), method, cache=(pages, table, jnp.zeros(1, jnp.int32)))
    return model.logits(h[:, n - 1]), pages, table

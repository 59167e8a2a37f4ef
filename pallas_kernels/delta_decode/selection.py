"""DELTA page selection: top `budget` pages by score, with the last `recent` pages forced in."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_FMAX = float(np.finfo(np.float32).max)


def valid_and_recent(num_pages: int, lengths, page_size: int, recent: int):
    """Pages holding tokens below each length, and the last `recent` of them.

    -> (valid, recent) bool [B, num_pages], num_valid int32 [B] (= ceil(length / page_size))."""
    num_valid = jnp.clip((lengths + page_size - 1) // page_size, 0, num_pages).astype(jnp.int32)
    pages = jnp.arange(num_pages, dtype=jnp.int32)[None, :]
    valid = pages < num_valid[:, None]
    return valid, valid & (pages >= num_valid[:, None] - recent), num_valid


def finish_selection(chosen, num_valid, num_pages: int):
    """chosen int32 [B, budget] (any order; entries >= num_valid are not valid pages) ->
    ascending valid pages first, then padding that repeats the last valid page."""
    budget = chosen.shape[1]
    big = jnp.int32(np.iinfo(np.int32).max)
    ordered = jnp.sort(jnp.where(chosen < num_valid[:, None], chosen, big), axis=-1)
    page_valid = jnp.arange(budget, dtype=jnp.int32)[None, :] < jnp.minimum(num_valid, budget)[:, None]
    last = jnp.clip(num_valid - 1, 0, num_pages - 1)
    return jnp.where(page_valid, ordered, last[:, None]).astype(jnp.int32), page_valid


TOPK_CHUNK = 1024  # pages per first-stage top-k; 0: one top-k over all pages


def top_indices(key, k: int, topk_chunk: int = TOPK_CHUNK):
    """Indices int32 [B, k] of the k largest entries of key float [B, P] (k <= P), ties to the lower index:
    those of `lax.top_k`. With P > topk_chunk, two stages: the top k of each chunk of `topk_chunk` entries, then the
    top k of those candidates (each of the overall top k is among its chunk's top k, and the candidates
    keep chunk and index order among equal keys), so no sort spans all P entries."""
    B, P = key.shape
    chunk = topk_chunk
    if not chunk or P <= chunk:
        return lax.top_k(key, k)[1].astype(jnp.int32)
    n = -(-P // chunk)
    blocks = jnp.pad(key, ((0, 0), (0, n * chunk - P)), constant_values=-jnp.inf).reshape(B, n, chunk)
    kc = min(k, chunk)
    values, local = lax.top_k(blocks, kc)
    index = (local + (jnp.arange(n, dtype=local.dtype) * chunk)[None, :, None]).reshape(B, n * kc)
    _, pos = lax.top_k(values.reshape(B, n * kc), k)
    return jnp.take_along_axis(index, pos, axis=1).astype(jnp.int32)


def select(page_scores, lengths, *, page_size: int, budget: int, recent: int, topk_chunk: int = TOPK_CHUNK):
    """page_scores float [B, P], lengths int [B] -> page_indices int32 [B, budget],
    page_valid bool [B, budget]. See `select_pages`; `topk_chunk`: see `top_indices`."""
    B, P = page_scores.shape
    valid, is_recent, num_valid = valid_and_recent(P, lengths, page_size, recent)
    score = jnp.nan_to_num(page_scores.astype(jnp.float32), nan=-_FMAX, posinf=_FMAX, neginf=-_FMAX)
    key = jnp.where(is_recent, jnp.inf, jnp.where(valid, score, -jnp.inf))
    if budget > P:
        key = jnp.pad(key, ((0, 0), (0, budget - P)), constant_values=-jnp.inf)
    return finish_selection(top_indices(key, budget, topk_chunk), num_valid, P)

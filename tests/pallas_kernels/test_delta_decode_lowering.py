"""The gpu (Triton) DELTA decode kernels lower for CUDA at Llama-3.1-8B shapes and their default
tiles: what interpret mode does not check (power-of-two tensor sizes at loads and stores, the
gathers through the page table, the dynamic loop bounds). Lowering stops before Triton's own
compilation, so shared memory is checked by `test_gpu_default_tiles_fit_shared_memory`."""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.delta_decode import paged_decode_attention, paged_sparse_decode_attention


def _kernels(f, *args):
    """The names of the Triton kernels of f lowered for CUDA (no device needed)."""
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r'custom_call @__gpu\$xla\.gpu\.triton.* name = "(\w+)"', text)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernels_lower_for_cuda(dtype):
    B, hq, hkv, D, P, pps = 2, 32, 8, 128, 1000, 300  # pps: not a multiple of pages_per_block
    q = jax.ShapeDtypeStruct((B, hq, D), dtype)
    pages = jax.ShapeDtypeStruct((hkv, P, 16, D), dtype)
    table = jax.ShapeDtypeStruct((B, pps), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    for scores, kernel in ((None, "delta_paged_decode"), ("pages", "delta_paged_decode_logits"),
                           ("tokens", "delta_paged_decode_logits")):
        names = _kernels(lambda *a: paged_decode_attention(*a, scores=scores, backend="gpu"),
                         q, pages, pages, table, lengths)
        assert names == [kernel, "delta_decode_combine"]
    sel = jax.ShapeDtypeStruct((B, 64), jnp.int32)
    valid = jax.ShapeDtypeStruct((B, 64), jnp.bool_)
    names = _kernels(lambda *a: paged_sparse_decode_attention(*a, backend="gpu"), q, pages, pages, table, sel,
                     valid, lengths)
    assert names == ["delta_paged_sparse_decode", "delta_decode_combine"]

"""GPU tile choice: every default tile fits the shared memory of one Triton program on Hopper."""

import dataclasses

import jax.numpy as jnp
import pytest

from pallas_kernels import sparse_prefill as sp

H100_ROWS = sp.BlockSizes(block_q=128, block_k=128, block_rows=128, num_warps=8, num_stages=3)


@pytest.mark.parametrize("kind", sp.KINDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_gpu_tiles_fit_shared_memory(kind, dtype, head_dim):
    bs = sp.default_block_sizes("gpu", head_dim, kind, dtype)
    assert sp.shared_memory_bytes(kind, bs, head_dim, dtype) <= sp.SHARED_MEMORY
    assert bs.num_stages >= 2 and bs.block_k >= 32


def test_the_measured_float32_failure_is_predicted():
    # Hopper, float32 exact rows at head_dim 128 with the H100 bf16 tiles: Triton requested 393216 bytes
    need = sp.shared_memory_bytes("rows", H100_ROWS, 128, jnp.float32)
    assert need >= 393216 > sp.SHARED_MEMORY
    assert sp.shared_memory_bytes("rows", H100_ROWS, 128, jnp.bfloat16) <= sp.SHARED_MEMORY
    # 4 stages of 128-key bf16 tiles exceeded shared memory on the H100 (NOTES.md)
    four = dataclasses.replace(H100_ROWS, num_stages=4)
    assert sp.shared_memory_bytes("rows", four, 128, jnp.bfloat16) > sp.SHARED_MEMORY


def test_tuned_bf16_tiles_are_kept_where_they_fit():
    assert sp.default_block_sizes("gpu", 128, "rows", jnp.bfloat16) == H100_ROWS
    sparse = sp.default_block_sizes("gpu", 128, "sparse", jnp.bfloat16)
    assert (sparse.block_q, sparse.block_k, sparse.num_stages, sparse.fold_heads) == (64, 64, 3, True)
    assert sp.default_block_sizes("gpu", 128, "rows", jnp.float32) != H100_ROWS


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        sp.default_block_sizes("gpu", 128, "dense")

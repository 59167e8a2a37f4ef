"""The Hopper (Mosaic GPU) window kernel in jax's GPU interpret mode (threads, barriers and TMA copies
simulated on the CPU; the two matmuls run as plain dots there) against the float64 reference."""

import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from pallas_kernels.sparse_prefill import hopper
from pallas_kernels.sparse_prefill.reference import masked_attention
from pallas_kernels.sparse_prefill.schedule import valid_mask

from .test_sparse_prefill import _inputs, ref64, rel_err


@pytest.mark.parametrize("B,T,H,Hkv,window,sinks,gamma,blocks", [
    (1, 512, 4, 2, 100, 16, None, (64, 64, 2)),    # band edges inside blocks, sinks in a part block
    (1, 512, 2, 1, 128, 0, None, (64, 64, 3)),     # no sinks, three slots
    (1, 512, 2, 1, 96, 16, 32, (64, 64, 2)),       # the taylor local keys (block-aligned window)
    (2, 384, 2, 2, 1000, 8, None, (64, 128, 2)),   # window past the sequence: dense causal; a batch
])
def test_hopper_window_matches_reference(B, T, H, Hkv, window, sinks, gamma, blocks):
    q, k, v = _inputs(T + window, B, T, H, Hkv, dtype=jnp.float16)
    out, lse = hopper.attend_window(q, k, v, window=window, sinks=sinks, gamma=gamma,
                                    blocks=hopper.HopperBlocks(*blocks), interpret=InterpretGPUParams())
    pos = jnp.arange(T, dtype=jnp.int32)
    mask = jnp.broadcast_to(valid_mask(pos[:, None], pos[None, :], window, sinks, gamma), (B, T, T))
    want, want_lse = ref64(masked_attention, q, k, v, mask)
    assert rel_err(out, want) < 3e-3  # p is rounded to float16 before the value matmul, as on the GPU
    assert rel_err(lse, want_lse) < 1e-5


def test_hopper_window_rejects_untiled_lengths():
    q, k, v = _inputs(0, 1, 192, 2, 1, dtype=jnp.float16)
    with pytest.raises(ValueError, match="T=192 must be a multiple"):
        hopper.attend_window(q, k, v, window=64, sinks=0, blocks=hopper.HopperBlocks(64, 128, 2))

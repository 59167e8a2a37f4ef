"""A long prefill's MLP over sequence chunks: the same block output, and no buffer of the residual's size added per
layer (a `lax.map` over the chunks took one per layer: 8 GiB of a 32K-token prefill of Llama-3.1-8B)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delta_jax import attention, model
from delta_jax.config import ModelConfig, PrefillConfig

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=160, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def test_a_block_in_chunks_equals_the_block_at_once():
    block = model.Block(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 96, CFG.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(96), (2, 96))
    inv_freq = model.rope_frequencies(CFG)

    def attend(q, k, v):
        return attention.prefill(q, k, v, jnp.full((2,), 96), PrefillConfig(method="dense")), None

    whole, _ = block(x, positions, inv_freq, attend, chunk=1 << 20)
    chunked, _ = block(x, positions, inv_freq, attend, chunk=32)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def _temp_bytes(layers: int, tokens: int, chunk: int) -> int:
    width = 256
    w = jax.ShapeDtypeStruct((width, width), jnp.float32)

    def fn(x, ws):
        for w in ws:
            x = model.residual_chunks(lambda y, w=w: jnp.tanh(y @ w) @ w, x, chunk)
        return x

    x = jax.ShapeDtypeStruct((1, tokens, width), jnp.float32)
    return jax.jit(fn).lower(x, [w] * layers).compile().memory_analysis().temp_size_in_bytes


def test_chunked_layers_add_no_buffer_of_the_residual_s_size():
    tokens, chunk = 8192, 2048
    residual = tokens * 256 * 4
    assert _temp_bytes(8, tokens, chunk) - _temp_bytes(2, tokens, chunk) < residual

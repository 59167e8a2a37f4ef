"""Prefill methods inside the model: window (sparse-only, recompute), delta and its variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delta_jax import delta
from delta_jax.config import ConfigError, ModelConfig, PrefillConfig
from delta_jax.engine import Engine
from pallas_kernels import sparse_prefill as pk
from pallas_kernels.sparse_prefill import reference

CFG = ModelConfig(model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_config(CFG, dtype="float32", seed=3)


def _qkv(b=2, t=150, h=4, kvh=2, d=64, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kvh, d)),
            jax.random.normal(ks[2], (b, t, kvh, d)))


def _dense(q, k, v):
    from delta_jax.attention import dense_prefill
    return dense_prefill(q, k, v)


@pytest.mark.parametrize("variant", ["published", "nd", "mix", "gated", "shrink", "fitted", "taylor"])
def test_window_covering_the_prompt_gives_dense_logits(engine, variant):
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 130).tolist()
    dense = engine.logits(tokens)
    ours = engine.logits(tokens, prefill="delta", window=512, sinks=4, gamma=16, variant=variant)
    assert np.max(np.abs(ours - dense)) <= 1e-5


def test_published_delta_equals_the_row_by_row_reference():
    q, k, v = _qkv()
    lengths = jnp.asarray([150, 150], jnp.int32)
    for smooth in (False, True):
        m = PrefillConfig(method="delta", window=24, sinks=4, gamma=16, tail=20, smooth=smooth)
        ours = delta.sparse_prefill(q, k, v, lengths, m)
        with jax.default_matmul_precision("highest"):
            want = reference.delta_attention_reference(q, k, v, window=24, sinks=4, gamma=16, tail=20, smooth=smooth)
        np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5)


@pytest.mark.parametrize("variant", ["published", "nd", "mix", "gated", "shrink", "fitted", "taylor"])
def test_sampled_rows_and_tail_are_exact(variant):
    q, k, v = _qkv(seed=1)
    lengths = jnp.asarray([150, 101], jnp.int32)
    m = PrefillConfig(method="delta", window=20, sinks=2, gamma=16, tail=10, variant=variant)
    out = np.asarray(delta.sparse_prefill(q, k, v, lengths, m))
    for b, n in enumerate([150, 101]):
        dense = np.asarray(_dense(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n]))[0]
        rows = [r for r in range(0, n - 10, 16)] + list(range(n - 10, n))
        np.testing.assert_allclose(out[b, rows], dense[rows], atol=2e-5)
        # rows elsewhere are not exact (the window misses context), so the check above is not vacuous
        assert np.max(np.abs(out[b, 40:n - 10] - dense[40:n - 10])) > 1e-3


def test_taylor_is_exact_when_a_block_shares_its_sampled_query():
    # every tangent bound is tight where the row's query equals the anchor's: with one query per block the
    # far part, the band and the window merge into dense attention for every row
    q, k, v = _qkv(seed=4)
    q = q[:, (jnp.arange(150) // 16) * 16]
    lengths = jnp.asarray([150, 150], jnp.int32)
    m = PrefillConfig(method="delta", window=20, sinks=2, gamma=16, tail=10, variant="taylor")
    np.testing.assert_allclose(np.asarray(delta.sparse_prefill(q, k, v, lengths, m)), np.asarray(_dense(q, k, v)),
                               atol=2e-5)
    published = PrefillConfig(method="delta", window=20, sinks=2, gamma=16, tail=10)
    assert np.max(np.abs(np.asarray(delta.sparse_prefill(q, k, v, lengths, published))
                         - np.asarray(_dense(q, k, v)))) > 1e-2


def test_taylor_beats_published_delta_on_random_inputs():
    q, k, v = _qkv(seed=5)
    lengths = jnp.asarray([150, 150], jnp.int32)
    dense = np.asarray(_dense(q, k, v))
    err = {var: np.abs(np.asarray(delta.sparse_prefill(q, k, v, lengths, PrefillConfig(
        method="delta", window=20, sinks=2, gamma=16, tail=10, variant=var))) - dense).mean()
        for var in ("published", "taylor")}
    assert err["taylor"] < err["published"]


def test_recompute_and_sparse_only_modes():
    q, k, v = _qkv(seed=2)
    lengths = jnp.asarray([150, 150], jnp.int32)
    sparse = np.asarray(pk.sparse_attention(q, k, v, window=20, sinks=2, backend="xla"))
    dense = np.asarray(_dense(q, k, v))
    only = np.asarray(delta.sparse_prefill(q, k, v, lengths, PrefillConfig(
        method="window", window=20, sinks=2, gamma=None, tail=0)))
    np.testing.assert_allclose(only, sparse, atol=1e-6)
    rec = np.asarray(delta.sparse_prefill(q, k, v, lengths, PrefillConfig(
        method="window", window=20, sinks=2, gamma=16, tail=8)))
    exact = np.zeros(150, bool)
    exact[::16] = True
    exact[-8:] = True
    np.testing.assert_allclose(rec[:, exact], dense[:, exact], atol=2e-5)
    np.testing.assert_allclose(rec[:, ~exact], sparse[:, ~exact], atol=1e-6)


def test_default_tail_is_the_authors():
    m = PrefillConfig(method="delta", gamma=64)
    assert m.tail_rows(1000) == 1000 % 64 + 128
    tail, bound = pk.tail_rows(jnp.asarray([1000, 100]), 64), pk.max_tail_rows(1024, 64)
    assert tail.tolist() == [1000 % 64 + 128, 100] and bound == 63 + 128


def test_batched_delta_prefill_equals_one_by_one(engine):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (230, 77)]
    kw = dict(prefill="delta", window=32, sinks=4, gamma=16, max_new_tokens=6)
    batched = engine.generate(prompts, **kw)
    for p, b in zip(prompts, batched):
        assert engine.generate([p], **kw)[0].tokens == b.tokens


def test_topk_blocks_base_runs_in_the_model(engine):
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, 300).tolist()
    dense = engine.logits(tokens)
    out = engine.logits(tokens, prefill="delta", window=32, sinks=4, gamma=16, base="topk_blocks", topk=2)
    assert np.isfinite(out).all() and out.shape == dense.shape


def test_bad_prefill_parameters():
    for kw, msg in ((dict(window=0), "window"), (dict(gamma=0), "gamma"), (dict(sinks=-1), "sinks"),
                    (dict(variant="nope"), "variant"), (dict(base="nope"), "base"),
                    (dict(variant="taylor", base="topk_blocks"), "taylor")):
        with pytest.raises(ConfigError, match=msg):
            PrefillConfig(method="delta", **kw)


def test_kernel_backend_is_set_for_the_block_and_restored_after_an_error():
    before = delta.KERNEL_BACKEND
    with pytest.raises(RuntimeError):
        with delta.kernel_backend("xla"):
            assert delta.KERNEL_BACKEND == "xla"
            with delta.kernel_backend("gpu"):
                assert delta.KERNEL_BACKEND == "gpu"
            assert delta.KERNEL_BACKEND == "xla"
            raise RuntimeError("inside the block")
    assert delta.KERNEL_BACKEND == before

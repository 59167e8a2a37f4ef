"""The parameter tree contract: Hugging Face tensor names -> tree paths, expected shapes, and the
streaming assembly of the tree (cast, transpose of linear kernels to in -> out)."""

from __future__ import annotations

import collections
import re
import sys
from typing import Callable, Iterable, Optional

import numpy as np

from delta_jax.config import ConfigError, ModelConfig

from .io import CheckpointError, host_array, numpy_dtype

_TOP = {
    "model.embed_tokens.weight": ("embed", "embedding"),
    "model.norm.weight": ("final_norm", "scale"),
    "lm_head.weight": ("lm_head", "kernel"),
}
_LAYER = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "self_attn.q_proj.bias": ("attn", "q_proj", "bias"),
    "self_attn.k_proj.bias": ("attn", "k_proj", "bias"),
    "self_attn.v_proj.bias": ("attn", "v_proj", "bias"),
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
    "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq$")


def is_ignored(hf_name: str) -> bool:
    """Buffers that are not parameters (rotary inv_freq)."""
    return bool(_IGNORED_RE.fullmatch(hf_name))


def tree_path(hf_name: str) -> Optional[tuple[str, ...]]:
    """The tree path of a HF tensor name, or None when the name is not part of the contract."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER:
        return ("layers", str(int(m.group(1)))) + _LAYER[m.group(2)]
    return None


def check_config(cfg: dict) -> dict:
    """Validates a HF config dict for conversion (the model's own rules, `ModelConfig.from_hf`) and
    returns a copy with the switches made explicit (`tie_word_embeddings`, `attention_bias`,
    `head_dim`, `num_key_value_heads`)."""
    try:
        mc = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError):
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if cfg.get(k) is None]
        raise CheckpointError(f"config.json lacks {missing[0]!r}" if missing else
                              f"config.json has malformed sizes: {cfg}") from None
    if cfg.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported")
    return {**cfg, "vocab_size": mc.vocab_size, "hidden_size": mc.hidden_size,
            "intermediate_size": mc.intermediate_size, "num_hidden_layers": mc.num_layers,
            "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim, "attention_bias": mc.attention_bias,
            "tie_word_embeddings": mc.tie_embeddings}


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape ([out, in] for linear weights) for a checked config."""
    v, h, i = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    nh, kvh, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nh * d, h),
        "self_attn.k_proj.weight": (kvh * d, h),
        "self_attn.v_proj.weight": (kvh * d, h),
        "self_attn.o_proj.weight": (h, nh * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if cfg["attention_bias"]:
        layer.update({"self_attn.q_proj.bias": (nh * d,), "self_attn.k_proj.bias": (kvh * d,),
                      "self_attn.v_proj.bias": (kvh * d,)})
    if cfg["model_type"] == "qwen3":
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    for n in range(cfg["num_hidden_layers"]):
        for k, s in layer.items():
            shapes[f"model.layers.{n}.{k}"] = s
    return shapes


def check_names(names: Iterable[str], expected: dict, source: str) -> list[str]:
    """The names to read, in the given order; errors on unknown or missing tensors."""
    keep, unknown = [], []
    for name in names:
        if name in expected:
            keep.append(name)
        elif is_ignored(name) or (name == "lm_head.weight" and "lm_head.weight" not in expected):
            continue
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"unexpected tensor(s) in {source}: {', '.join(sorted(unknown)[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + " (not part of the llama/mistral/qwen2/qwen3 layout for this config)")
    missing = sorted(set(expected) - set(keep))
    if missing:
        raise CheckpointError(
            f"missing tensor(s) in {source}: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if len(set(keep)) != len(keep):
        dup = sorted(n for n, c in collections.Counter(keep).items() if c > 1)
        raise CheckpointError(f"tensor(s) stored twice in {source}: {', '.join(dup[:5])}")
    return keep


def to_param(hf_name: str, array: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    """Cast (if `dtype`) and transpose linear weights [out, in] -> kernel [in, out]; a fresh contiguous array."""
    path = tree_path(hf_name)
    target = numpy_dtype(dtype) if dtype else array.dtype
    if path[-1] == "kernel":
        return np.ascontiguousarray(array.T, dtype=target)
    return np.array(array, dtype=target, copy=True, order="C")


def insert(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def build_tree(names: list[str], expected: dict, read: Callable[[str], np.ndarray], dtype: Optional[str],
               source: str, progress: bool) -> dict:
    """Reads each tensor once (in `names` order), checks its shape, converts it, and builds the tree."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc=f"converting {source}", unit="tensor", file=sys.stderr)
    tree: dict = {}
    try:
        for name in names:
            array = read(name)
            if tuple(array.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"tensor {name} in {source} has shape {tuple(array.shape)}, expected {tuple(expected[name])}")
            insert(tree, tree_path(name), host_array(to_param(name, array, dtype)))
            del array
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return tree

"""GGUF (llama.cpp) files: metadata -> HF config dict, tensors -> HF names and layout, dequantized to float32.

GGUF lists a tensor's dims fastest-first (`ne`); `gguf.GGUFReader` already exposes the data in numpy
(slowest-first) order, so a dequantized `attn_q.weight` is HF's `[out, in]`. llama.cpp's converter
permutes the rows of the q and k projections of each head from HF's half-split rotary layout
(`[x0..x_{d/2-1}, x_{d/2}..]`, rotate_half) to the interleaved pairs its rope kernel uses;
`unpermute_rotary` undoes that.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from .io import CheckpointError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on a non-GGUF file
        raise CheckpointError(f"cannot read GGUF file {path!r}: {e}") from e


def field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, str or list; `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF tensor name for a GGUF tensor name, or None when it has no counterpart."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{int(m.group(1))}.{_LAYER[m.group(2)]}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pair i, half j) -> (half j, pair i).

    w: [n_head * head_dim, in] as stored in GGUF; returns the same shape in HF (rotate_half) order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute {rows} rows over {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader, path: str) -> dict:
    """A HF-style llama config.json dict from the GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"unsupported GGUF architecture {arch!r} in {path!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def req(key):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"GGUF file {path!r} lacks metadata {arch}.{key}")
        return v

    names = {t.name for t in reader.tensors}
    heads = int(req("attention.head_count"))
    kv = field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):
        if len(set(kv)) != 1:
            raise CheckpointError(f"per-layer head_count_kv {kv} in {path!r} is not supported")
        kv = kv[0]
    hidden = int(req("embedding_length"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot = field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rot) != head_dim:
        raise CheckpointError(f"partial rotary (rope.dimension_count={rot}, head_dim={head_dim}) is not supported")
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise CheckpointError(
            f"rope scaling in GGUF {path!r} ({scaling or 'rope_freqs.weight'}) is not supported; "
            "convert the Hugging Face safetensors checkpoint instead")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "rope_theta": _f32(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = pad
    return cfg


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


class GGUFTensors:
    """HF-named float32 tensors of a GGUF file, dequantized one at a time."""

    def __init__(self, reader, cfg: dict, path: str):
        self.reader = reader
        self.cfg = cfg
        self.by_hf = {}
        unknown = []
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
            else:
                self.by_hf[name] = t
        if unknown:
            raise CheckpointError(
                f"unexpected tensor(s) in GGUF {path!r}: {', '.join(sorted(unknown)[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))

    def names(self) -> list[str]:
        """HF names in file order."""
        return list(self.by_hf)

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize
        t = self.by_hf[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"tensor {t.name}: {e}") from e
        w = np.array(w, dtype=np.float32, copy=True)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rotary(w, self.cfg["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rotary(w, self.cfg["num_key_value_heads"])
        return w

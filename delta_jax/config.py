"""Model configuration from a Hugging Face config.json, and the per-phase method parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from pallas_kernels.sparse_prefill.correction import VARIANTS, tail_rows

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A configuration or argument the library cannot honour; the message names the bad value, and `param` the
    request field it belongs to where there is one (the server's error body)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape and switches shared by Llama, Mistral, Qwen2 and Qwen3."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds the config from a Hugging Face `config.json` dict."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {d.get('hidden_act')!r}; only 'silu' is supported")
        rs = d.get("rope_scaling") or None
        rope_theta = d.get("rope_theta")
        rp = d.get("rope_parameters")  # transformers >= 5 folds theta and scaling into one dict
        if rp:
            rope_theta = rope_theta or rp.get("rope_theta")
            if rp.get("rope_type", "default") != "default":
                rs = rp
        scaling = None
        if rs:
            rope_type = rs.get("rope_type", rs.get("type"))
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
            elif rope_type not in (None, "default"):
                raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: 'llama3'")
        if d.get("sliding_window") and d.get("use_sliding_window", model_type == "mistral"):
            if model_type == "mistral" and d["sliding_window"] < d.get("max_position_embeddings", 0):
                raise ConfigError(
                    f"model-native sliding_window={d['sliding_window']} is not supported; "
                    "set it to null in config.json to run full attention")
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(model_type == "qwen2" if d.get("attention_bias") is None
                                else d["attention_bias"]),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            return cls.from_hf(json.load(f))


PREFILL_VARIANTS = VARIANTS


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Prefill attention: `dense`, `window` (sliding window + sinks, optionally with exact strided rows
    and tail: the authors' `recompute` mode) or `delta` (Delta Attention).

    `tail=None` means the authors' default: the last `T % gamma + max(128, gamma)` rows are exact.
    For `window`, `gamma=None` computes no strided rows (with `tail=0`: the authors' `sparse-only`).
    `variant` selects the correction for `delta`: "published" (the paper's), or our variants
    "nd" (correction of the softmax numerator and denominator), "mix" (each row's local output mixed
    with the sampled row's far output at the sampled row's far mass), "gated" (per-head gate by the
    agreement of consecutive deltas), "shrink" (per-head least-squares shrinkage of the delta toward
    zero, fitted on how well each sampled row's delta predicts the next one's), "fitted" (per-head,
    per-lag least-squares weight of the sampled row's delta, fitted on the contiguous exact tail), "taylor"
    (each row's far attention from first-order bounds of the far log-partition at three sampled queries,
    see `pallas_kernels.sparse_prefill.correction`). `topk` key blocks per query block for `base="topk_blocks"`.
    `dense_layers`: the first layers run dense attention (the HiP-style exact first layers).
    """

    method: str = "dense"
    window: int = 2048
    sinks: int = 64
    gamma: Optional[int] = 64
    tail: Optional[int] = None
    smooth: bool = False
    base: str = "window"
    variant: str = "published"
    topk: int = 8
    dense_layers: int = 0

    def __post_init__(self):
        if self.method not in ("dense", "window", "delta"):
            raise ConfigError(f"unknown prefill method {self.method!r}; choose dense, window or delta")
        if self.method == "dense":
            return
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.gamma is not None and self.gamma < 1:
            raise ConfigError(f"gamma must be >= 1, got {self.gamma}")
        if self.method == "delta" and self.gamma is None:
            raise ConfigError("delta prefill needs gamma")
        if self.tail is not None and self.tail < 0:
            raise ConfigError(f"tail must be >= 0, got {self.tail}")
        if self.base not in ("window", "topk_blocks"):
            raise ConfigError(f"unknown sparse base {self.base!r}; choose window or topk_blocks")
        if self.variant not in PREFILL_VARIANTS:
            raise ConfigError(f"unknown delta variant {self.variant!r}; choose one of {PREFILL_VARIANTS}")
        if self.variant == "taylor" and self.base != "window":
            raise ConfigError(f"variant 'taylor' needs base='window' (its band and far keys are defined by the "
                              f"window), got base={self.base!r}")
        if self.dense_layers < 0:
            raise ConfigError(f"dense_layers must be >= 0, got {self.dense_layers}")

    def tail_rows(self, length: int) -> int:
        """Number of exact tail rows for a prompt of `length` tokens."""
        if self.method == "dense":
            return length
        return tail_rows(length, self.gamma, self.tail)


DECODE_VARIANTS = ("published", "sum", "per_layer")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decode attention: `dense`, or `delta` (DELTA: full, selection and sparse layers).

    `selection_layers=None` scales the reference's layers 2, 14, 22 of 28 to the model depth;
    `full_layers=None` means the first two layers. `variant`: "published", "sum" (pages ranked by
    the head-mean of the softmax) or "per_layer" (every non-full layer selects its own pages: the
    upper bound for per-layer methods).
    """

    method: str = "dense"
    full_layers: Optional[tuple[int, ...]] = None
    selection_layers: Optional[tuple[int, ...]] = None
    page_size: int = 16
    budget: int = 64
    recent: int = 8
    variant: str = "published"

    def __post_init__(self):
        if self.method not in ("dense", "delta"):
            raise ConfigError(f"unknown decode method {self.method!r}; choose dense or delta")
        if self.variant not in DECODE_VARIANTS:
            raise ConfigError(f"unknown DELTA variant {self.variant!r}; choose one of {DECODE_VARIANTS}")
        if self.method == "dense":
            return
        if self.page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {self.page_size}")
        if self.recent < 0:
            raise ConfigError(f"recent must be >= 0, got {self.recent}")
        if self.budget < max(self.recent, 1):
            raise ConfigError(f"budget={self.budget} pages must be >= recent={self.recent} and >= 1")

    def schedule(self, num_layers: int) -> tuple[str, ...]:
        """Per-layer role: 'full', 'selection' or 'sparse'. Validates the schedule."""
        if self.method == "dense":
            return tuple("full" for _ in range(num_layers))
        full = tuple(range(min(2, num_layers))) if self.full_layers is None else tuple(self.full_layers)
        sel = self.selection_layers
        if sel is None:
            sel = tuple(sorted({min(num_layers - 1, x * num_layers // 28) for x in (2, 14, 22)}))
        roles = ["sparse"] * num_layers
        for name, layers in (("full_layers", full), ("selection_layers", sel)):
            for i in layers:
                if not 0 <= i < num_layers:
                    raise ConfigError(f"{name} contains layer {i}, outside 0..{num_layers - 1}")
        overlap = set(full) & set(sel)
        if overlap:
            raise ConfigError(f"layers {sorted(overlap)} are both full and selection layers")
        for i in full:
            roles[i] = "full"
        for i in sel:
            roles[i] = "selection"
        seen_selection = False
        for i, r in enumerate(roles):
            if r == "selection":
                seen_selection = True
            elif r == "sparse" and not seen_selection:
                raise ConfigError(
                    f"layer {i} would be sparse before any selection layer; add it to full_layers "
                    f"or put a selection layer before it (full={list(full)}, selection={list(sel)})")
        return tuple(roles)

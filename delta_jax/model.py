"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3): one Decoder with switches.

Shapes: tokens `[batch, seq]`; hidden `[batch, seq, hidden]`; q `[batch, seq, heads, head_dim]`;
the KV cache is paged (`delta_jax.cache`): per layer `[kv_heads, pages, page_size, head_dim]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from delta_jax import attention
from delta_jax.config import DecodeConfig, ModelConfig, PrefillConfig

MLP_CHUNK = 16384  # prefill runs the MLP over pieces of this many tokens (bounded activations at 1M tokens)


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis, statistics in float32 (as Hugging Face Llama)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]` (float32), with Llama 3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, half-split layout. x `[batch, seq, heads, head_dim]`, positions `[batch, seq]`."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention; the attention itself is the `attend` function of the phase."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = _linear(cfg, h, cfg.num_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(cfg, h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(cfg, h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * d, h, False, dtype, param_dtype, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, attend):
        """x `[b, s, hidden]`; `attend(q [b, s, H, D], k, v [b, s, KVH, D]) -> (o [b, s, H, D], aux)`."""
        b, s, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o, aux = attend(apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v)
        return self.o_proj(o.reshape(b, s, -1)), aux


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, h, i, False, dtype, param_dtype, rngs)
        self.up_proj = _linear(cfg, h, i, False, dtype, param_dtype, rngs)
        self.down_proj = _linear(cfg, i, h, False, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def residual_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
    """`x + fn(x)` for `x [b, T, ...]` and a `fn` that maps each token on its own, over sequence chunks of `chunk`
    tokens one at a time (bounded activations), updated in place: no buffer of x's size is added per call (the
    results of a `lax.map` took one per layer: 8 GiB of a 32K-token prefill of Llama-3.1-8B)."""
    t = x.shape[1]
    if t <= chunk or t % chunk:
        return x + fn(x)

    def body(i, x):
        piece = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(x, piece + fn(piece), i * chunk, axis=1)

    return jax.lax.fori_loop(0, t // chunk, body, x)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, attend,
                 chunk: int = MLP_CHUNK):
        """x `[b, s, hidden]` -> (x, aux of `attend`); the MLP runs over `chunk`-token pieces of long inputs."""
        a, aux = self.attn(self.attn_norm(x), positions, inv_freq, attend)
        x = x + a
        return residual_chunks(lambda y: self.mlp(self.mlp_norm(y)), x, chunk), aux


class Decoder(nnx.Module):
    """Embedding, `num_layers` blocks, final norm and LM head (tied or untied)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, dtype, param_dtype, rngs)

    def logits(self, h: jax.Array) -> jax.Array:
        """Float32 logits `[..., vocab]` from final hidden states `[..., hidden]` (before the final norm)."""
        h = self.final_norm(h)
        if self.cfg.tie_embeddings:
            w = self.embed.embedding[...].astype(h.dtype)
            prec = jax.lax.Precision.HIGHEST if h.dtype == jnp.float32 else None
            return jnp.einsum("...h,vh->...v", h, w, precision=prec,
                              preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, method: PrefillConfig, cache=None,
                trace: bool = False):
        """Runs the prompt. tokens `[b, T]` right-padded, lengths `[b]`.

        `cache`: None, or `(pages, page_table [b, W], row_shard [b])` to write each layer's keys and values
        into the rows' pages (`delta_jax.cache`; `row_shard`: the data shard that holds each row).
        Returns hidden `[b, T, hidden]`, the updated pages (or None) and, with `trace`, per-layer
        attention outputs `[layers, b, T, heads, head_dim]`.
        """
        b, t = tokens.shape
        inv_freq = rope_frequencies(self.cfg)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        pages, traces = [], []
        dense = PrefillConfig(method="dense")
        for i, layer in enumerate(self.layers):
            def attend(q, k, v, i=i):
                o = attention.prefill(q, k, v, lengths, dense if i < method.dense_layers else method)
                written = None if cache is None else attention.write_prompt(cache[0][i], k, v, *cache[1:])
                return o, (written, o if trace else None)

            x, (written, o) = layer(x, positions, inv_freq, attend)
            pages.append(written)
            traces.append(o)
        return x, (tuple(pages) if cache is not None else None), (jnp.stack(traces) if trace else None)

    def decode(self, tokens: jax.Array, positions: jax.Array, active: jax.Array, pages, page_table: jax.Array,
               method: DecodeConfig, record: bool = False):
        """One decode step over the paged cache. tokens `[b]` at `positions [b]` (the row's length so far),
        `active [b]` (inactive rows write nothing and attend to nothing); pages and page_table as in
        `delta_jax.cache`. Returns (logits `[b, vocab]`, pages).

        Every layer appends its key and value; the attention per layer follows the method's schedule.
        With `record`, also returns per layer its own softmax mass per page `[layers, b, pages]`, its own
        DELTA page scores (same shape) and the page selection it attended to (`[layers, b, budget]`
        indices and validity; all-invalid for layers that attended densely): the diagnostic of how well
        a shared selection covers a layer.
        """
        inv_freq = rope_frequencies(self.cfg)
        x = self.embed(tokens[:, None])
        roles = method.schedule(self.cfg.num_layers)
        new_pages, selection, records = [], None, []
        for i, layer in enumerate(self.layers):
            def attend(q, k, v, i=i, selection=selection):
                o, written, selection = attention.decode(q[:, 0], k[:, 0], v[:, 0], pages[i], page_table, positions,
                                                         active, roles[i], selection, method)
                return o[:, None], (written, selection, q[:, 0])

            x, (written, selection, q) = layer(x, positions[:, None], inv_freq, attend)
            new_pages.append(written)
            if record:
                from delta_jax.cache import gather
                from delta_jax.delta import page_stats
                b = tokens.shape[0]
                used = roles[i] == "sparse" or (method.variant == "per_layer" and roles[i] != "full")
                idx = selection[0] if used else jnp.zeros((b, method.budget), jnp.int32)
                valid = selection[1] if used else jnp.zeros((b, method.budget), bool)
                kc = gather(written[0], page_table)
                records.append((*page_stats(q, kc, jnp.where(active, positions + 1, 0), method.page_size), idx, valid))
        logits = self.logits(x[:, 0])
        if record:
            return logits, tuple(new_pages), tuple(jnp.stack(r) for r in zip(*records))
        return logits, tuple(new_pages)

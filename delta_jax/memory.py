"""What a request needs in device memory, against what the device has: refuse before compiling.

Estimates (per device): the KV pages, the prefill activations of the largest prefill batch, and the
sampling logits. The weights are already on the device when these are checked, so the figure they are
compared with is the device's free memory (accelerators: `bytes_limit - bytes_in_use`; the CPU: the
host's available memory, shared by every simulated device).
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from delta_jax.config import ConfigError, ModelConfig
from delta_jax.model import MLP_CHUNK

GiB = 2**30
HEADROOM = 0.95  # share of the free memory a request may plan to use (XLA's temporaries, fragmentation)
SIZING_MARGIN = 0.02  # a KV pool is sized so that its worst prefill fits with this share of XLA's figure to spare,
# for what the scheduler allocates beside the pool once it exists (slot state, decode outputs): sized to the
# byte, the run-time check of the same prefill refused it (H100, 2026-12-07)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def prefill_bytes(cfg: ModelConfig, batch: int, tokens: int, dtype, model_shards: int = 1) -> int:
    """Peak activations of one prefill of `batch x tokens` (per device, heads and MLP split over `model_shards`)."""
    s, n = jnp.dtype(dtype).itemsize, batch * tokens
    heads = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // model_shards
    per_token = (s * (3 * cfg.hidden_size + heads)                # residual, norm, o_proj out; q, k, v, o
                 + 4 * (2 * cfg.num_heads * cfg.head_dim // model_shards)   # float32 outputs inside the attention
                 + 4 * 3 * cfg.head_dim)                          # rotary angles
    mlp = batch * min(tokens, MLP_CHUNK) * 3 * cfg.intermediate_size * s // model_shards
    return n * per_token + mlp + batch * cfg.vocab_size * 4


class DoesNotFit(ConfigError):
    """A compiled step needs more device memory than is free (raised before it runs)."""


_ANALYSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _analysis(compiled):
    """XLA's memory analysis of `compiled` (None where the backend gives none), read once per executable: reading
    it walks the whole program (60 ms for Llama-3.1-8B's prefill, on the host), and every prefill is checked."""
    try:
        return _ANALYSES[compiled]
    except (KeyError, TypeError):
        pass
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        m = None
    try:
        _ANALYSES[compiled] = m
    except TypeError:  # not weak-referenceable: read again next time
        pass
    return m


def call_bytes(compiled) -> Optional[int]:
    """Device bytes one call of `compiled` allocates beyond its arguments (XLA's temporaries and the outputs not
    aliased to a donated argument), from XLA's own buffer assignment; None when the backend does not say."""
    m = _analysis(compiled)
    return None if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def temp_bytes(compiled) -> Optional[int]:
    """XLA's temporaries of one call of `compiled`: one allocation, so they need one free block that large."""
    m = _analysis(compiled)
    return None if m is None else int(m.temp_size_in_bytes)


def devices_sharing(mesh) -> int:
    """Devices whose memory is one pool: simulated CPU devices share the host's; accelerators have their own."""
    if mesh is None or jax.default_backend() != "cpu":
        return 1
    return mesh.devices.size


class Fit(NamedTuple):
    """What `shortfall` found: `short` bytes per device by which a call overruns its share of the free memory or
    its temporaries the largest free block (<= 0 when it fits); `fragmented` when only the largest free block is
    too small; XLA's figure per device (`need`, None when the backend gives none); the free bytes and what they
    are; XLA's temporaries and the largest free block (None when not reported)."""
    short: float
    fragmented: bool
    need: Optional[int]
    free: int
    where: str
    temp: Optional[int]
    block: Optional[int]


def shortfall(compiled, mesh=None, reserve: int = 0, margin: float = 0.0) -> Fit:
    """How one call of `compiled` on `mesh` fits the device's memory (`Fit`). `reserve`: bytes per device about
    to be taken from the largest free block first (a pool being sized); `margin`: share of XLA's figure to keep
    spare beyond it."""
    need = call_bytes(compiled)
    free, where = free_bytes()
    free -= reserve * devices_sharing(mesh)
    over_free = -1.0 if need is None else need * (1 + margin) - HEADROOM * free / devices_sharing(mesh)
    temp, block = temp_bytes(compiled), largest_free_block()
    over_block = -1.0
    if block is not None:
        block -= reserve
        if temp is not None:
            over_block = temp - block
    return Fit(max(over_free, over_block), over_free <= 0 < over_block, need, free, where, temp, block)


def check_call(compiled, what: str, hint: str, mesh=None) -> None:
    """Raises DoesNotFit naming both figures when a call of `compiled` (per device, on `mesh`) cannot fit the
    device's free memory."""
    fit = shortfall(compiled, mesh)
    if fit.need is None or fit.short <= 0:
        return
    if fit.fragmented:
        raise DoesNotFit(f"{what} needs one block of {fit.temp / GiB:.1f} GiB (XLA's temporaries) but the largest "
                         f"free block is {fit.block / GiB:.1f} GiB ({fit.free / GiB:.1f} GiB is {fit.where}, "
                         f"fragmented); {hint}{_fraction_hint()}")
    raise DoesNotFit(f"{what} needs {fit.need * devices_sharing(mesh) / GiB:.2f} GiB of device memory (XLA's "
                     f"temporaries and outputs) but {fit.free / GiB:.2f} GiB is {fit.where}, of which a call may plan "
                     f"on {HEADROOM:.0%}; {hint}{_fraction_hint()}")


def _fraction_hint() -> str:
    """On a GPU where jax keeps its default share of the memory, how to raise it (else empty)."""
    if jax.default_backend() == "gpu" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        return "; jax holds 75% of the GPU by default: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 raises it"
    return ""


def largest_free_block(devices=None) -> Optional[int]:
    """The largest contiguous free block of the accelerator's allocator (None on the CPU or when not reported)."""
    dev = (devices or jax.local_devices())[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    block = (stats or {}).get("largest_free_block_bytes")
    return None if block is None else int(block)


def free_bytes(devices=None) -> tuple[int, str]:
    """(free bytes, what they are) on the first of `devices`: the accelerator's, or the host's on the CPU."""
    dev = (devices or jax.local_devices())[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{dev.device_kind} free"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"], "host memory available"


def check(parts: dict[str, int], *, devices_sharing: int = 1, hint: str, free: Optional[int] = None) -> None:
    """Raises ConfigError naming what is needed and what is free when `parts` (bytes per device) do not fit.

    `devices_sharing`: devices whose memory is the same pool (simulated CPU devices share the host's)."""
    avail, what = free_bytes() if free is None else (free, "free")
    need = sum(parts.values()) * devices_sharing
    if need > HEADROOM * avail:
        detail = ", ".join(f"{k} {v * devices_sharing / GiB:.1f} GiB" for k, v in parts.items() if v)
        raise ConfigError(f"this needs {need / GiB:.1f} GiB ({detail}) but {avail / GiB:.1f} GiB is {what} "
                          f"(the weights already loaded); {hint}{_fraction_hint()}")

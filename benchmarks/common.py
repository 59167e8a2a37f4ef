"""Shared benchmark helpers: model shapes, timing, device ceilings, JSON and plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from delta_jax.config import ModelConfig, RopeScaling


def llama31_8b() -> ModelConfig:
    """Llama-3.1-8B shapes (random weights are used for timing)."""
    return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                       max_position_embeddings=131072 * 8)


def tiny() -> ModelConfig:
    """A small config for --smoke runs on the CPU."""
    return ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)


def time_fn(fn, *args, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of `fn(*args)` (outputs blocked on), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def hbm_bandwidth(gib: float = 2.0) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = int(gib * 2**30) // 4
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    t = time_fn(copy, x, reps=10)
    return 2 * n * 4 / t


def matmul_ceiling(n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(f, a, b, reps=10)


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "num_devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_json(obj, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path

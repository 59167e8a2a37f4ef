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


def hbm_bandwidth(gib: float = 2.0, read_only: bool = False) -> float:
    """Measured device bandwidth in bytes/s over `gib` GiB: a copy's (bytes read + bytes written), or with
    `read_only` a sum's (bytes read: what a decode step does to its cache)."""
    n = int(gib * 2**30) // 4
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    t = time_fn(jax.jit(jnp.sum if read_only else lambda a: a * 1.0001), x, reps=10)
    return (1 if read_only else 2) * n * 4 / t


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


def device_profile(fn, top: int = 25) -> dict:
    """Runs `fn()` under the jax profiler and sums the device time per op name (GPU kernels, collectives).

    Returns {"total_us": ..., "ops": [[name, total_us, count], ...]} for the `top` ops by time."""
    import collections
    import glob
    import gzip
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn())
        paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not paths:
            return {"error": "no trace written"}
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n.upper()}
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device:
            total[e["name"]] += float(e.get("dur", 0))
            count[e["name"]] += 1
    return {"total_us": sum(total.values()),
            "ops": [[n, round(t, 1), count[n]] for n, t in total.most_common(top)]}

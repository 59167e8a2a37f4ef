"""End-to-end decode step: dense (XLA, Pallas decode kernel) vs DELTA, random-weight Llama-3.1-8B shapes.

The KV cache is filled with random values (decode cost does not depend on its content); every
method runs on the same weights and cache in one process. Reports per-step latency, tokens/s and
the bytes each step must read (weights + KV) against the measured HBM bandwidth.

    python benchmarks/decode.py --out benchmarks/results          # on the GPU
    python benchmarks/decode.py --smoke                            # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax.config import DecodeConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402


def kv_bytes(cfg, method: DecodeConfig, batch: int, length: int, itemsize: int) -> int:
    """KV bytes one step must read: full and selection layers the whole cache, sparse layers the pages."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    total = 0
    for role in method.schedule(cfg.num_layers):
        tokens = length if role != "sparse" else min(length, method.budget * method.page_size)
        total += batch * tokens * per_token
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    a = ap.parse_args(argv)

    cfg = common.tiny() if a.smoke else common.llama31_8b()
    lens = [256, 512] if a.smoke else [int(x) for x in a.lens.split(",")]
    batches = [1, 2] if a.smoke else [int(x) for x in a.batches.split(",")]
    engine = Engine.from_config(cfg, dtype="bfloat16", max_seq_len=max(lens))
    env = common.environment()
    bw = None if a.smoke else common.hbm_bandwidth()
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.state))
    full, sel = ((0,), (1, 3)) if a.smoke else ((0, 1), tuple(x * cfg.num_layers // 28 for x in (2, 14, 22)))
    methods = {
        "dense_xla": DecodeConfig(method="dense"),
        "dense_pallas": DecodeConfig(method="dense", kernel="pallas"),
        "delta": DecodeConfig(method="delta", full_layers=full, selection_layers=sel),
        "delta_pallas_full": DecodeConfig(method="delta", full_layers=full, selection_layers=sel, kernel="pallas"),
    }
    if a.smoke:
        methods = {k: dataclasses.replace(m, budget=4, recent=2) if m.method == "delta" else m
                   for k, m in methods.items() if k != "dense_pallas" and k != "delta_pallas_full"}
    rows = []
    for length in lens:
        for batch in batches:
            need = weight_bytes + 2 * cfg.num_layers * batch * cfg.num_kv_heads * length * cfg.head_dim * 2
            free = _free_bytes()
            if free is not None and need > 0.9 * free:
                rows.append({"length": length, "batch": batch, "skipped": f"needs {need / 2**30:.0f} GiB"})
                print(f"skip T={length} b={batch}: needs {need / 2**30:.0f} GiB", flush=True)
                continue
            key = jax.random.PRNGKey(length + batch)
            shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
            cache = tuple((jax.random.normal(jax.random.fold_in(key, 2 * i), shape, jnp.bfloat16),
                           jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, jnp.bfloat16))
                          for i in range(cfg.num_layers))
            start = length - a.steps - 1
            for name, m in methods.items():
                fn = jax.jit(engine._decode_fn(m), donate_argnums=(1,))
                tok = jnp.zeros((batch,), jnp.int32) + 7
                pos = jnp.full((batch,), start, jnp.int32)
                args = (jax.random.PRNGKey(0), jnp.float32(0.0), jnp.float32(1.0))
                try:
                    tok, cache = fn(engine.state, cache, tok, pos, *args)  # compile + warm-up
                    jax.block_until_ready(tok)
                    import time
                    t0 = time.perf_counter()
                    for s in range(a.steps):
                        tok, cache = fn(engine.state, cache, tok, pos + 1 + s, *args)
                    jax.block_until_ready(tok)
                    step = (time.perf_counter() - t0) / a.steps
                except Exception as e:  # record, keep going
                    rows.append({"length": length, "batch": batch, "method": name, "error": str(e)[:300]})
                    print(f"{name} T={length} b={batch}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                kvb = kv_bytes(cfg, m, batch, length, 2)
                row = {"length": length, "batch": batch, "method": name, "step_ms": step * 1e3,
                       "tokens_per_s": batch / step, "kv_bytes": kvb, "weight_bytes": weight_bytes,
                       "achieved_bytes_per_s": (kvb + weight_bytes) / step}
                if bw:
                    row["fraction_of_hbm"] = row["achieved_bytes_per_s"] / bw
                rows.append(row)
                print(f"{name:18s} T={length:7d} b={batch}: {step * 1e3:8.2f} ms/step "
                      f"{batch / step:8.1f} tok/s", flush=True)
            del cache
    for r in rows:
        if "step_ms" in r and r["method"] != "dense_xla":
            base = next((x for x in rows if x.get("method") == "dense_xla" and x["length"] == r["length"]
                         and x["batch"] == r["batch"] and "step_ms" in x), None)
            if base:
                r["speedup_vs_dense_xla"] = base["step_ms"] / r["step_ms"]
    result = {"env": env, "hbm_bytes_per_s": bw, "config": dataclasses.asdict(cfg), "steps": a.steps,
              "methods": {k: dataclasses.asdict(m) for k, m in methods.items()}, "rows": rows}
    path = common.write_json(result, a.out, "decode_smoke.json" if a.smoke else "decode.json")
    _plot(rows, os.path.join(a.out, "decode_smoke.png" if a.smoke else "decode.png"), env)
    print(f"\nwrote {path}")
    print(f"{'method':18s} {'T':>7s} {'b':>2s} {'ms/step':>9s} {'tok/s':>8s} {'x dense':>8s} {'HBM %':>6s}")
    for r in rows:
        if "step_ms" in r:
            print(f"{r['method']:18s} {r['length']:7d} {r['batch']:2d} {r['step_ms']:9.2f} {r['tokens_per_s']:8.1f} "
                  f"{r.get('speedup_vs_dense_xla', 1.0):8.2f} {100 * r.get('fraction_of_hbm', 0):6.1f}")


def _free_bytes():
    try:
        stats = jax.devices()[0].memory_stats()
        return stats["bytes_limit"] - stats["bytes_in_use"]
    except Exception:
        return None


def _plot(rows, path, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if "step_ms" in r]
    for name in sorted({r["method"] for r in done}):
        for b in sorted({r["batch"] for r in done}):
            pts = sorted((r["length"], r["step_ms"]) for r in done if r["method"] == name and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name} b={b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode step, Llama-3.1-8B shapes, {env['device']}, jax {env['jax']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

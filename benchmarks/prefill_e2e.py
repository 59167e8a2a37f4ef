"""Time to first token: dense (cuDNN) vs window vs delta prefill, random-weight Llama-3.1-8B shapes.

Every method runs the whole model (all layers, MLPs, LM head) on the same weights and prompt in one
process; the time is the jit-compiled prefill step (compilation excluded), median of a few runs.

    python benchmarks/prefill_e2e.py --out benchmarks/results      # on the GPU
    python benchmarks/prefill_e2e.py --smoke                        # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax.config import PrefillConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", default="dense,window,delta", help="from dense, window, delta, delta_taylor")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    cfg = common.tiny() if a.smoke else common.llama31_8b()
    lens = [512, 1024] if a.smoke else [int(x) for x in a.lens.split(",")]
    window, sinks, gamma = (64, 8, 16) if a.smoke else (2048, 64, 64)
    engine = Engine.from_config(cfg, dtype="bfloat16", max_seq_len=max(lens))
    methods = {
        "dense": PrefillConfig(method="dense"),
        "window": PrefillConfig(method="window", window=window, sinks=sinks, gamma=None, tail=0),
        "delta": PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma),
        "delta_taylor": PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma, variant="taylor"),
    }
    methods = {k: methods[k] for k in a.methods.split(",")}
    env = common.environment()
    rows = []
    for length in lens:
        tokens = jax.random.randint(jax.random.PRNGKey(length), (1, length), 0, cfg.vocab_size, jnp.int32)
        lengths = jnp.asarray([length], jnp.int32)
        for name, m in methods.items():
            fn = jax.jit(engine._prefill_fn(m, length))
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(engine.state, tokens, lengths))
                compile_s = time.perf_counter() - t0
                sec = common.time_fn(fn, engine.state, tokens, lengths, reps=a.reps, warmup=0)
            except Exception as e:
                rows.append({"length": length, "method": name, "error": str(e)[:300]})
                print(f"{name} T={length}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append({"length": length, "method": name, "seconds": sec, "first_call_seconds": compile_s})
            print(f"{name:8s} T={length:7d}: {sec:8.3f} s", flush=True)
    for r in rows:
        base = next((x for x in rows if x["length"] == r["length"] and x["method"] == "dense" and "seconds" in x), None)
        if base and "seconds" in r:
            r["speedup_vs_dense"] = base["seconds"] / r["seconds"]
    result = {"env": env, "config": dataclasses.asdict(cfg),
              "methods": {k: dataclasses.asdict(m) for k, m in methods.items()}, "rows": rows}
    name = "prefill_e2e_smoke" if a.smoke else ("prefill_e2e" if a.methods == "dense,window,delta"
                                                 else "prefill_e2e_" + a.methods.replace(",", "_"))
    path = common.write_json(result, a.out, name + ".json")
    print(f"\nwrote {path}")
    print(f"{'method':8s} {'T':>7s} {'seconds':>9s} {'x dense':>8s}")
    for r in rows:
        if "seconds" in r:
            print(f"{r['method']:8s} {r['length']:7d} {r['seconds']:9.3f} {r.get('speedup_vs_dense', 1):8.2f}")


if __name__ == "__main__":
    main()

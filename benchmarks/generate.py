"""What users get from `Engine.generate`: time to first token and decode tokens/s, beside the back-to-back
decode loop and the bandwidth bound, random-weight Llama-3.1-8B shapes.

Every case (prompt length x batch) runs each (prefill, decode) pair through `Engine.generate` twice: the first
call compiles (its times exclude compilation, but include each executable's first run: module loads, first
allocations), the second is what a user's next request gets and is the one reported (`cold_*`: the first).
Then the same compiled decode loop runs back to back (`--b2b`: chunks dispatched without reading tokens), and
the bandwidth bound: bytes a decode step must read (weights + the KV it attends to, per device) over the copy
bandwidth measured in the same run.

    python benchmarks/generate.py --out benchmarks/results/generate --tag h200        # one GPU
    python benchmarks/generate.py --mesh model=2 --tag h200x2                         # two GPUs
    python benchmarks/generate.py --smoke                                             # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax.config import DecodeConfig, PrefillConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from delta_jax.scheduler import Request  # noqa: E402


def methods(smoke: bool) -> tuple[dict, dict]:
    w, s, g = (64, 8, 16) if smoke else (2048, 64, 64)
    sel_ref, sel_cal, full = ((1,), (1, 2), (0,)) if smoke else ((2, 16, 25), (2, 3, 6, 7, 15), (0, 1))
    budget, recent = (4, 1) if smoke else (64, 8)
    prefill = {"dense": PrefillConfig(), "window": PrefillConfig(method="window", window=w, sinks=s, gamma=None, tail=0),
               "delta": PrefillConfig(method="delta", window=w, sinks=s, gamma=g),
               "taylor": PrefillConfig(method="delta", window=w, sinks=s, gamma=g, variant="taylor")}
    decode = {"dense": DecodeConfig(),
              "delta_ref": DecodeConfig(method="delta", full_layers=full, selection_layers=sel_ref, budget=budget,
                                        recent=recent),
              "delta_cal": DecodeConfig(method="delta", full_layers=full, selection_layers=sel_cal, budget=budget,
                                        recent=recent)}
    return prefill, decode


def step_bytes(engine: Engine, decode: DecodeConfig, length: int, batch: int) -> int:
    """Bytes one decode step must read per device: the weights (all but the embedding table) and the KV each
    layer attends to."""
    cfg = engine.config
    leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(engine.state)]
    weights = sum(x.addressable_shards[0].data.nbytes for p, x in leaves if "embed" not in jax.tree_util.keystr(p))
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(engine.dtype).itemsize
    shards = engine.mesh.shape["model"] if engine.mesh is not None else 1
    read = 0
    for role in decode.schedule(cfg.num_layers):
        tokens = length if role != "sparse" else min(length, decode.budget * decode.page_size)
        read += batch * tokens * per_token
    return weights + read // shards


def back_to_back(engine, prefill, decode, length, batch, new, chunk, reps, profile=False):
    """Seconds per decode step of the compiled loop dispatched `reps` times back to back (no host reads), and
    with `profile` the device time per op of one more chunk."""
    if (reps + 2) * chunk >= new:
        raise ValueError(f"back to back needs new={new} > (reps + 2) * chunk = {(reps + 2) * chunk} (rows must stay active)")
    sched = engine.scheduler_for([length] * batch, new, prefill, decode, chunk=chunk)
    rng = np.random.default_rng(1)
    for _ in range(batch):
        sched.submit(Request(prompt=rng.integers(0, engine.config.vocab_size, length).tolist(), max_tokens=new))
    sched.step()  # prefill and the first chunk
    pages, slots = sched.pages, sched.slots
    pages, slots, out = engine.steps.decode(decode, chunk, engine.state, pages, slots)  # warm
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        pages, slots, out = engine.steps.decode(decode, chunk, engine.state, pages, slots)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / (reps * chunk)
    prof = None
    if profile:
        prof = common.device_profile(lambda: engine.steps.decode(decode, chunk, engine.state, pages, slots)[2])
    sched.pages = pages
    sched.close()
    return seconds, prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="32768x1,131072x1,32768x8", help="length x batch, comma-separated")
    ap.add_argument("--pairs", default="dense:dense,window:-,delta:delta_ref,taylor:delta_cal",
                    help="prefill:decode pairs (decode '-': time to first token only)")
    ap.add_argument("--batch-pairs", default="dense:dense,delta:delta_ref", help="pairs for cases with batch > 1")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--chunk", type=int, default=16, help="decode steps per dispatch")
    ap.add_argument("--b2b", type=int, default=4, help="back-to-back chunks to time (0: skip)")
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (time a few layers of a long "
                    "dense prefill and extrapolate, labelled as such)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds: start no new case after this")
    ap.add_argument("--out", default="benchmarks/results/generate")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="device time per op of one back-to-back chunk")
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="report the first call (compile excluded) instead of a second, warm call")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    if a.smoke:
        cfg = dataclasses.replace(common.tiny(), num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=128)
        a.cases, a.new, a.chunk, a.b2b = "512x1,256x2", 40, 8, 2
    else:
        cfg = common.llama31_8b()
    if a.layers:
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE", "/tmp/jax_cache"))
    cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
    prefills, decodes = methods(a.smoke)
    engine = Engine.from_config(cfg, dtype="bfloat16" if not a.smoke else "float32", mesh=a.mesh,
                                max_seq_len=max(t for t, _ in cases) + a.new + 256, progress=True)
    env = common.environment()
    bw = common.hbm_bandwidth(0.25 if a.smoke else 2.0)
    rows, skipped = [], []
    result = {"env": env, "mesh": a.mesh, "layers": cfg.num_layers, "copy_bytes_per_s": bw, "new_tokens": a.new, "chunk": a.chunk,
              "prefill": {k: vars(v) for k, v in prefills.items()}, "decode": {k: vars(v) for k, v in decodes.items()},
              "rows": rows, "skipped": skipped}
    for length, batch in cases:
        pairs = a.pairs if batch == 1 else a.batch_pairs
        rng = np.random.default_rng(length + batch)
        prompts = [rng.integers(0, cfg.vocab_size, length).tolist() for _ in range(batch)]
        for pair in pairs.split(","):
            pname, dname = pair.split(":")
            key = f"{length}x{batch} {pname}+{dname}"
            if time.perf_counter() - t_start > a.deadline:
                skipped.append(key)
                continue
            dec = decodes.get(dname, DecodeConfig())
            row = {"length": length, "batch": batch, "prefill": pname, "decode": dname}
            t_row, compiled = time.perf_counter(), engine.steps.compile_seconds
            try:
                run = lambda: engine.generate(prompts, max_new_tokens=a.new if dname != "-" else 1,  # noqa: E731
                                              prefill=prefills[pname], decode=dec, chunk=a.chunk)
                cold = run()  # compiles (excluded from its times) and runs each executable a first time
                row["cold_ttft_s"] = max(o.ttft_seconds for o in cold)
                if dname != "-":
                    row["cold_generate_step_ms"] = 1e3 / float(np.mean([o.decode_tokens_per_second for o in cold]))
                outs = run() if a.warm else cold
                row.update(ttft_s=max(o.ttft_seconds for o in outs), prefill_s=max(o.prefill_seconds for o in outs))
                if a.profile and batch == 1:
                    row["profile_prefill"] = common.device_profile(lambda: engine.generate(
                        prompts, max_new_tokens=1, prefill=prefills[pname], decode=dec, chunk=a.chunk) and None)
                    print("profile prefill", json.dumps(row["profile_prefill"])[:2500], flush=True)
                if dname != "-":
                    per_row = float(np.mean([o.decode_tokens_per_second for o in outs]))
                    row.update(generate_step_ms=1e3 / per_row, generate_tokens_per_s=per_row * batch,
                               bytes_per_step=step_bytes(engine, dec, length, batch))
                    row["bound_step_ms"] = 1e3 * row["bytes_per_step"] / bw
                    if a.b2b:
                        s, prof = back_to_back(engine, prefills[pname], dec, length, batch, a.new, a.chunk, a.b2b,
                                               a.profile)
                        if prof is not None:
                            row["profile_one_chunk"] = prof
                            print("profile", json.dumps(prof)[:3000], flush=True)
                        row.update(b2b_step_ms=1e3 * s, generate_vs_b2b=row["generate_step_ms"] / (1e3 * s),
                                   b2b_fraction_of_bound=row["bound_step_ms"] / (1e3 * s))
                    row["generate_fraction_of_bound"] = row["bound_step_ms"] / row["generate_step_ms"]
            except Exception as e:  # a refusal (memory) or a failure is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            stats = jax.local_devices()[0].memory_stats() or {}
            row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
            row.update(compile_s=engine.steps.compile_seconds - compiled, wall_s=time.perf_counter() - t_row)
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            common.write_json(result, a.out, f"generate_{a.tag}.json")
    _plot(result, os.path.join(a.out, f"generate_{a.tag}.png"))
    print(f"\n{'case':<10} {'prefill+decode':<18} {'TTFT s':>8} {'gen ms/tok':>10} {'b2b ms':>8} {'bound ms':>8} "
          f"{'gen/b2b':>7} {'tok/s':>8}")
    for r in rows:
        print(f"{r['length']}x{r['batch']:<4} {r['prefill'] + '+' + r['decode']:<18} {r.get('ttft_s', float('nan')):8.3f} "
              f"{r.get('generate_step_ms', float('nan')):10.2f} {r.get('b2b_step_ms', float('nan')):8.2f} "
              f"{r.get('bound_step_ms', float('nan')):8.2f} {r.get('generate_vs_b2b', float('nan')):7.3f} "
              f"{r.get('generate_tokens_per_s', float('nan')):8.1f} {r.get('error', '')[:60]}")
    if skipped:
        print("skipped (deadline):", ", ".join(skipped))


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "generate_step_ms" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [r["generate_step_ms"] for r in rows], 0.27, label="Engine.generate")
    ax.bar(x, [r.get("b2b_step_ms", 0) for r in rows], 0.27, label="loop back to back")
    ax.bar(x + 0.27, [r["bound_step_ms"] for r in rows], 0.27, label="bandwidth bound")
    ax.set_xticks(x, [f"{r['length'] // 1024}Kx{r['batch']}\n{r['decode']}" for r in rows], fontsize=8)
    ax.set_ylabel("ms per decode step")
    env = result["env"]
    ax.set_title(f"{env['device']} x{env['num_devices']} mesh={result['mesh']}, jax {env['jax']}, {env['date']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Prefill attention benchmark: dense (XLA, cuDNN), cuDNN sliding window, and our block-sparse
kernels (sliding window + sinks, exact rows, Delta Attention, its `taylor` variant), Llama-3.1-8B
attention shapes.

    PYTHONPATH=. python benchmarks/prefill_attention.py --max-len 1048576
    PYTHONPATH=. python benchmarks/prefill_attention.py --check          # kernels vs references, bf16 and f32
    PYTHONPATH=. python benchmarks/prefill_attention.py --smoke          # tiny, CPU
    PYTHONPATH=. python benchmarks/prefill_attention.py --tune --lens 131072,262144 --bench-lens 65536

Writes prefill_attention[_TAG].json and .png to --out, prints a table last. TFLOP/s count only
the score entries each method computes (4 * B * H * D per entry; the taylor far pass also
accumulates the keys, a third matmul per entry not counted), against a measured bf16 matmul
ceiling. Delta and taylor use an exact tail of gamma rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import sparse_prefill as sp  # noqa: E402
from pallas_kernels.sparse_prefill import reference as ref  # noqa: E402
from benchmarks import common  # noqa: E402


def time_fn(fn, *args, reps=5, warmup=1):
    """Median seconds over `reps` calls after `warmup` calls (outputs blocked on)."""
    return common.time_fn(fn, *args, reps=reps, warmup=warmup)


def matmul_ceiling(n):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / time_fn(jax.jit(lambda x, y: x @ y), a, b, reps=10, warmup=2)


def entries_dense(T):
    return T * (T + 1) / 2


def entries_window(T, window, sinks):
    t = np.arange(T, dtype=np.float64)
    near = np.minimum(t + 1, window)
    far = np.clip(np.minimum(sinks, t + 1 - window), 0, None)
    return float((near + far).sum())


def entries_rows(rows):
    return float((np.asarray(rows, np.float64) + 1).sum())


def entries_taylor(T, window, sinks, gamma):
    """Block-aligned window and sinks of every row, the far keys of every anchor (its longest range),
    and the exact tail."""
    t = np.arange(T, dtype=np.float64)
    span = window + t % gamma
    local = np.minimum(t + 1, span) + np.clip(np.minimum(sinks, t + 1 - span), 0, None)
    a = np.arange(-(-T // gamma), dtype=np.float64)
    far = np.clip(np.minimum((a + 1) * gamma - window, T - 1) - sinks + 1, 0, None)
    return float(local.sum() + far.sum()) + entries_rows(np.arange(T - gamma, T))


def make_inputs(T, B, H, Hkv, D, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D), dtype), jax.random.normal(kk, (B, T, Hkv, D), dtype),
            jax.random.normal(kv, (B, T, Hkv, D), dtype))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def spot_check(args, backend, interpret, bs, rbs=None, fbs=None, dtype=jnp.bfloat16):
    """Our kernels against the dense-mask references (float32) at a small T, each check alone."""
    T = args.check_len
    q, k, v = make_inputs(T, 1, args.heads, args.kv_heads, args.head_dim, dtype, seed=7)
    w, s, g = min(args.window, T // 4), min(args.sinks, T // 8), args.gamma
    kw = dict(backend=backend, interpret=interpret, block_sizes=bs)
    rkw = dict(backend=backend, interpret=interpret, block_sizes=rbs or bs)
    rows = sp.delta_rows(T, g, g)
    checks = {
        "window_sinks": lambda: rel_err(sp.sparse_attention(q, k, v, window=w, sinks=s, **kw),
                                        ref.sparse_attention_reference(q, k, v, window=w, sinks=s)),
        "window_sinks_lse": lambda: rel_err(
            sp.sparse_attention(q, k, v, window=w, sinks=s, return_lse=True, **kw)[1],
            ref.sparse_attention_reference(q, k, v, window=w, sinks=s, return_lse=True)[1]),
        "exact_rows": lambda: rel_err(sp.exact_rows_attention(q, k, v, rows, **rkw),
                                      ref.exact_rows_reference(q, k, v, rows)),
        "exact_rows_lse": lambda: rel_err(sp.exact_rows_attention(q, k, v, rows, return_lse=True, **rkw)[1],
                                          ref.exact_rows_reference(q, k, v, rows, return_lse=True)[1]),
        "delta": lambda: rel_err(sp.delta_attention(q, k, v, window=w, sinks=s, gamma=g, tail=g,
                                                    rows_block_sizes=rbs, **kw),
                                 ref.delta_attention_reference(q, k, v, window=w, sinks=s, gamma=g, tail=g)),
        "taylor_local": lambda: rel_err(
            sp.sparse_attention(q, k, v, window=w, sinks=s, gamma=g, **kw),
            ref.masked_attention(q, k, v, _aligned_mask(T, w, s, g))[0]),
        "taylor_far_lse": lambda: _far_check(q, k, v, w, s, g, backend, interpret, fbs),
        "taylor": lambda: rel_err(
            sp.delta_attention(q, k, v, window=w, sinks=s, gamma=g, tail=0, variant="taylor",
                               far_block_sizes=fbs, **kw),
            ref.taylor_reference(q, k, v, window=w, sinks=s, gamma=g)),
    }
    if args.topk:
        checks["delta_topk_blocks"] = lambda: rel_err(
            sp.delta_attention(q, k, v, window=w, sinks=s, gamma=g, base="topk_blocks", topk=args.topk, **kw),
            ref.delta_attention_reference(
                q, k, v, window=w, sinks=s, gamma=g,
                sparse_fn=lambda q_, k_, v_: _topk_reference(q_, k_, v_, w, s, args.topk, bs)))
    if jax.default_backend() == "gpu" and dtype != jnp.float32:  # cuDNN takes 16-bit inputs only
        checks["window_vs_cudnn_window"] = lambda: rel_err(
            sp.sparse_attention(q, k, v, window=w, sinks=0, **kw),
            jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                         local_window_size=(w - 1, 0)))
    res = {}
    wanted = args.checks.split(",") if args.checks else list(checks)
    with jax.default_matmul_precision("highest"):
        for name, fn in ((n, f) for n, f in checks.items() if n in wanted):
            try:
                res[name] = fn()
            except Exception as e:  # noqa: BLE001
                res[name] = f"error: {type(e).__name__}: {str(e)[:1500]}"
    return res


def _aligned_mask(T, window, sinks, gamma):
    t = np.arange(T)[:, None]
    s = np.arange(T)[None, :]
    return jnp.asarray((s <= t) & ((s > t - t % gamma - window) | (s < sinks)))[None]


def _far_check(q, k, v, window, sinks, gamma, backend, interpret, fbs):
    """Far log-partitions of the anchors (phase 1: their own block's far keys) against dense masks."""
    _, _, lse = sp.far_statistics(q, k, v, window=window, sinks=sinks, gamma=gamma, backend=backend,
                                  interpret=interpret, block_sizes=fbs)
    T = q.shape[1]
    r = np.arange(0, T, gamma)
    keys = np.arange(T)[None, :]
    mask = jnp.asarray((keys >= sinks) & (keys <= (r - window)[:, None]))[None]
    _, want = ref.masked_attention(q[:, ::gamma], k, v, mask)             # [1, H, n]
    got, want = np.asarray(lse[..., 1]).transpose(0, 2, 1), np.asarray(want)
    ok = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), ok):
        return float("nan")
    return rel_err(got[ok], want[ok])


def _topk_reference(q, k, v, window, sinks, topk, bs):
    from pallas_kernels.sparse_prefill.topk_blocks import block_mask_from_indices
    idx, cnt = sp.select_blocks(q, k, block_q=bs.block_q, block_k=bs.block_k, window=window, sinks=sinks, topk=topk)
    mask = block_mask_from_indices(idx, cnt, -(-q.shape[1] // bs.block_k))
    return ref.block_sparse_reference(q, k, v, mask, block_q=bs.block_q, block_k=bs.block_k)


def methods(args, backend, interpret, bs, rbs=None, fbs=None):
    w, s, g = args.window, args.sinks, args.gamma
    kw = dict(backend=backend, interpret=interpret, block_sizes=bs)
    rkw = dict(backend=backend, interpret=interpret, block_sizes=rbs)
    out = {
        "xla_dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "cudnn_dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "cudnn_window": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn", local_window_size=(w - 1, 0)),
        "ours_window": lambda q, k, v: sp.sparse_attention(q, k, v, window=w, sinks=s, **kw),
        "ours_window_triton": lambda q, k, v: sp.sparse_attention(
            q, k, v, window=w, sinks=s, **dict(kw, block_sizes=dataclasses.replace(
                bs or sp.default_block_sizes(backend, q.shape[-1], "sparse", q.dtype), hopper=False))),
        "ours_rows": lambda q, k, v: sp.exact_rows_attention(q, k, v, sp.delta_rows(q.shape[1], g, g), **rkw),
        "ours_delta": lambda q, k, v: sp.delta_attention(q, k, v, window=w, sinks=s, gamma=g, tail=g,
                                                         rows_block_sizes=rbs, **kw),
        "ours_taylor": lambda q, k, v: sp.delta_attention(q, k, v, window=w, sinks=s, gamma=g, tail=g,
                                                          variant="taylor", rows_block_sizes=rbs,
                                                          far_block_sizes=fbs, **kw),
    }
    if backend != "gpu":  # the Triton window kernel is ours_window there
        del out["cudnn_dense"], out["cudnn_window"], out["ours_window_triton"]
    return {name: jax.jit(f) for name, f in out.items()}


def entries_of(name, T, args):
    w, s, g = args.window, args.sinks, args.gamma
    rows = entries_rows(np.asarray(sp.delta_rows(T, g, g))[0])
    return {"xla_dense": entries_dense(T), "cudnn_dense": entries_dense(T),
            "cudnn_window": entries_window(T, w, 0), "ours_window": entries_window(T, w, s),
            "ours_window_triton": entries_window(T, w, s),
            "ours_rows": rows, "ours_delta": entries_window(T, w, s) + rows,
            "ours_taylor": entries_taylor(T, w, s, g)}[name]


def reps_for(name, T):
    if "dense" in name:
        return 1 if T >= 262144 else (2 if T >= 65536 else 5)
    return 3 if T >= 262144 else (5 if T >= 32768 else 10)


def run_benchmark(args, backend, interpret, bs, deadline, log, rbs=None, fbs=None):
    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
    fns = methods(args, backend, interpret, bs, rbs, fbs)
    results = []
    dense_dead = {"xla_dense": False, "cudnn_dense": False}
    for T in args.lens:
        q, k, v = make_inputs(T, B, H, Hkv, D, jnp.bfloat16)
        row = {"T": T}
        for name, fn in fns.items():
            if name == "xla_dense" and (T > args.xla_max_len or dense_dead[name]):
                row[name] = {"skipped": "too large for xla dense" if T > args.xla_max_len else "oom earlier"}
                continue
            if name in dense_dead and dense_dead[name]:
                row[name] = {"skipped": "failed at a smaller T"}
                continue
            if time.time() > deadline:
                row[name] = {"skipped": "time budget"}
                continue
            try:
                t = time_fn(fn, q, k, v, reps=1 if args.smoke else reps_for(name, T),
                            warmup=1)
                ent = entries_of(name, T, args)
                flops = 4 * B * H * D * ent
                row[name] = {"seconds": t, "entries": ent, "tflops": flops / t / 1e12}
                if name in ("ours_delta", "ours_taylor"):
                    mem = fn.lower(q, k, v).compile().memory_analysis()
                    if mem is not None:
                        row[name]["temp_bytes"] = int(mem.temp_size_in_bytes)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                row[name] = {"error": msg}
                if name in dense_dead:
                    dense_dead[name] = True
                log(f"  {name} T={T}: {msg}")
        for base in ("cudnn_dense", "cudnn_window"):
            bt = row.get(base, {}).get("seconds")
            for name in ("ours_window", "ours_window_triton", "ours_rows", "ours_delta", "ours_taylor"):
                t = row.get(name, {}).get("seconds")
                if bt and t:
                    row[name][f"speedup_vs_{base}"] = bt / t
        results.append(row)
        log(f"T={T}: " + ", ".join(f"{n}={r['seconds'] * 1e3:.2f}ms" for n, r in row.items()
                                    if isinstance(r, dict) and "seconds" in r))
        del q, k, v
    return results


WINDOW_VARIANTS = [  # (block_q, block_k, num_warps, num_stages, fold_heads[, one_loop])
    (64, 64, 4, 3, True), (64, 64, 4, 3, True, True), (128, 64, 8, 3, True), (128, 64, 8, 3, True, True),
    (128, 64, 8, 3, False), (128, 64, 8, 3, False, True), (128, 128, 8, 3, True, True), (64, 64, 4, 4, True, True),
    (128, 64, 4, 3, True), (128, 128, 8, 3, True), (128, 64, 8, 4, True), (64, 64, 4, 3, False),
    (128, 64, 8, 2, True), (64, 128, 4, 3, True), (128, 32, 4, 3, True)]
ROWS_VARIANTS = [  # (block_rows, block_k, num_warps, num_stages)
    (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3),
    (128, 128, 8, 2), (64, 128, 4, 3), (128, 128, 4, 3), (128, 32, 4, 4)]
FAR_VARIANTS = [  # (block_rows, block_k, num_warps, num_stages) of the taylor far-statistics kernel
    (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
    (32, 64, 4, 3)]


def _timed(fn, q, k, v, reps):
    t = time_fn(fn, q, k, v, reps=reps)
    return t, fn(q, k, v)


def run_tune(args, backend, interpret, deadline, log):
    """Times tile variants of the window (at args.lens[0]), exact-rows and taylor far-statistics
    (at args.lens[-1]) kernels; each output is compared with the first variant's. Variants that do
    not fit shared memory (`sp.shared_memory_bytes`) are skipped. Returns records and the best
    BlockSizes of each kernel."""
    w, s, g, D = args.window, args.sinks, args.gamma, args.head_dim
    out, best = [], {}
    kernels = (("window", args.lens[0], WINDOW_VARIANTS), ("rows", args.lens[-1], ROWS_VARIANTS),
               ("far", args.lens[-1], FAR_VARIANTS))
    for kind, T, variants in (x for x in kernels if x[0] in args.tune_kernels.split(",")):
        q, k, v = make_inputs(T, 1, args.heads, args.kv_heads, D, jnp.bfloat16)
        rows = sp.delta_rows(T, g, g)
        base_name = "cudnn_window" if kind == "window" else "cudnn_dense"
        win = (w - 1, 0) if kind == "window" else None
        if kind == "far":  # the anchors' far keys: about the work of the strided exact rows
            rows = sp.delta_rows(T, g, 0)
        try:
            base_s = time_fn(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", local_window_size=win)), q, k, v,
                reps=3 if kind == "window" else 2)
        except Exception as e:  # noqa: BLE001
            base_s = None
            log(f"{base_name} error {type(e).__name__}")
        ent = entries_window(T, w, s) if kind == "window" else entries_rows(np.asarray(rows)[0])
        base_ent = entries_window(T, w, 0) if kind == "window" else entries_dense(T)
        log(f"tune {kind} T={T}: {base_name} {base_s}")
        first = None
        for var in variants:
            if time.time() > deadline:
                break
            if kind == "window":
                bq, bk, nw, ns, fold, one_loop = var + (False,) * (6 - len(var))
                bs = sp.BlockSizes(block_q=bq, block_k=bk, num_warps=nw, num_stages=ns, fold_heads=fold,
                                   one_loop=one_loop, hopper=False)
                f = jax.jit(lambda q, k, v, bs=bs: sp.sparse_attention(
                    q, k, v, window=w, sinks=s, backend=backend, interpret=interpret, block_sizes=bs))
            elif kind == "rows":
                br, bk, nw, ns = var
                bs = sp.BlockSizes(block_k=bk, block_rows=br, num_warps=nw, num_stages=ns)
                f = jax.jit(lambda q, k, v, bs=bs: sp.exact_rows_attention(
                    q, k, v, rows, backend=backend, interpret=interpret, block_sizes=bs))
            else:
                br, bk, nw, ns = var
                bs = sp.BlockSizes(block_k=bk, block_rows=br, num_warps=nw, num_stages=ns)
                f = jax.jit(lambda q, k, v, bs=bs: sp.far_statistics(
                    q, k, v, window=w, sinks=s, gamma=g, backend=backend, interpret=interpret, block_sizes=bs)[1])
            rec = {"kernel": kind, "T": T, "block_sizes": dataclasses.asdict(bs), f"{base_name}_s": base_s}
            tile_kind = "sparse" if kind == "window" else kind
            if sp.shared_memory_bytes(tile_kind, bs, D, jnp.bfloat16) > sp.SHARED_MEMORY:
                rec["skipped"] = "does not fit shared memory"
                out.append(rec)
                log(f"  {kind} {var}: skipped, does not fit shared memory")
                continue
            try:
                t, o = _timed(f, q, k, v, reps=5)
                first = o if first is None else first
                rec.update(seconds=t, tflops=4 * args.heads * D * ent / t / 1e12, rel_to_first=rel_err(o, first))
                if base_s:
                    rec["base_tflops"] = 4 * args.heads * D * base_ent / base_s / 1e12
                    rec["speedup_vs_base"] = base_s / t
                if rec["rel_to_first"] < 2e-2 and (kind not in best or t < best[kind][1]):
                    best[kind] = (bs, t)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out.append(rec)
            log(f"  {kind} {var}: " + (f"{rec['seconds'] * 1e3:.2f} ms, {rec['tflops']:.0f} TFLOP/s, "
                                       f"x{rec.get('speedup_vs_base', 0):.2f} vs {base_name}, "
                                       f"rel {rec['rel_to_first']:.1e}" if "seconds" in rec else rec["error"]))
        del q, k, v
    return out, {kind: dataclasses.asdict(b[0]) for kind, b in best.items()}, \
        {kind: b[0] for kind, b in best.items()}


CHECK_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}


def run_check(args, backend, interpret, tiles, info, log, path):
    """Every kernel against its dense-mask reference in bfloat16 and float32, with the default tiles
    of each dtype (the smoke tiles off the GPU). Writes JSON; exits 1 if a check fails."""
    info["check"] = {}
    failed = []
    for dtype in (jnp.bfloat16, jnp.float32):
        name = jnp.dtype(dtype).name
        if backend == "gpu":
            tiles = tuple(sp.default_block_sizes(backend, args.head_dim, kind, dtype) for kind in ("sparse", "rows", "far"))
        res = spot_check(args, backend, interpret, *tiles, dtype=dtype)
        info["check"][name] = {"tiles": [dataclasses.asdict(t) for t in tiles], "rel_err": res}
        for check, err in res.items():
            ok = isinstance(err, float) and err < CHECK_TOLERANCE[name]
            failed += [] if ok else [f"{name} {check}: {err}"]
        log(f"{name} (rel. error vs reference, T={args.check_len}, tolerance {CHECK_TOLERANCE[name]}): "
            + json.dumps(res, indent=1))
    info["failed"] = failed
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    log("check: " + ("all passed" if not failed else "FAILED " + "; ".join(failed)))
    if failed:
        sys.exit(1)
    return info


def print_table(results, ceiling):
    cols = ["xla_dense", "cudnn_dense", "cudnn_window", "ours_window", "ours_window_triton", "ours_rows", "ours_delta",
            "ours_taylor"]
    print(f"\nbf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s; times in ms (TFLOP/s on computed scores)")
    print(f"{'T':>8} " + " ".join(f"{c:>20}" for c in cols)
          + f" {'delta/cudnn':>11} {'taylor/cudnn':>12} {'win/cudnnW':>10}")
    for row in results:
        cells = []
        for c in cols:
            r = row.get(c)
            if r is None:
                cells.append(f"{'-':>20}")
            elif "seconds" in r:
                cells.append(f"{r['seconds'] * 1e3:>11.2f} ({r['tflops']:>5.0f})")
            else:
                cells.append(f"{('skip' if 'skipped' in r else 'ERR'):>20}")
        sd = row.get("ours_delta", {}).get("speedup_vs_cudnn_dense")
        st = row.get("ours_taylor", {}).get("speedup_vs_cudnn_dense")
        sw = row.get("ours_window", {}).get("speedup_vs_cudnn_window")
        fmt = lambda x, n: "-" if x is None else f"{x:.{n}f}"
        print(f"{row['T']:>8} " + " ".join(cells) + f" {fmt(sd, 1):>11} {fmt(st, 1):>12} {fmt(sw, 2):>10}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in ["xla_dense", "cudnn_dense", "cudnn_window", "ours_window", "ours_window_triton", "ours_rows",
                 "ours_delta", "ours_taylor"]:
        pts = [(r["T"], r[name]["seconds"]) for r in results if "seconds" in r.get(name, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("seconds per attention call (32 q heads, 8 kv heads, d=128, bf16)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lens", type=str, default=None, help="comma-separated sequence lengths")
    p.add_argument("--min-len", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=1 << 20)
    p.add_argument("--xla-max-len", type=int, default=16384, help="largest T tried with XLA dense")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--gamma", type=int, default=64)
    p.add_argument("--topk", type=int, default=0, help="also spot-check base='topk_blocks' with this topk")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--check-len", type=int, default=2048)
    p.add_argument("--checks", type=str, default=None, help="comma-separated spot checks to run (default: all)")
    p.add_argument("--backend", type=str, default=None)
    p.add_argument("--budget-s", type=float, default=540, help="stop starting new timings after this")
    p.add_argument("--no-check", action="store_true", help="skip the correctness spot check")
    p.add_argument("--check", action="store_true",
                   help="only the correctness checks, in bfloat16 and float32 (no timing)")
    p.add_argument("--tune", action="store_true",
                   help="sweep tiles (window kernel at the first of --lens, rows at the last); then, with "
                        "--bench-lens, run the benchmark there with the best tiles")
    p.add_argument("--bench-lens", type=str, default=None)
    p.add_argument("--tune-kernels", type=str, default="window,rows,far", help="which kernels --tune sweeps")
    p.add_argument("--tune-budget-s", type=float, default=None, help="stop tuning after this")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode off GPU")
    p.add_argument("--tag", type=str, default="")
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim = 4, 2, 64
        args.window, args.sinks, args.gamma, args.check_len = 64, 16, 16, 200
        args.lens = args.lens or "256,512"
        args.xla_max_len = 512
    if args.lens:
        args.lens = [int(x) for x in args.lens.split(",")]
    else:
        args.lens = [1 << i for i in range(args.min_len.bit_length() - 1, args.max_len.bit_length())
                     if args.min_len <= (1 << i) <= args.max_len]
    backend = args.backend or ("gpu" if jax.default_backend() == "gpu" else "xla")
    interpret = args.smoke and jax.default_backend() != backend
    if backend == "gpu" or not args.smoke:
        bs, rbs, fbs = (sp.default_block_sizes(backend, args.head_dim, kind) for kind in ("sparse", "rows", "far"))
    else:
        bs = rbs = fbs = sp.BlockSizes(block_q=32, block_k=16, block_rows=32)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = jax.devices()[0]
    info = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "backend": backend, "interpret": bool(interpret),
            "shapes": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                       "dtype": "bfloat16"},
            "window": args.window, "sinks": args.sinks, "gamma": args.gamma, "tail": args.gamma}
    log(json.dumps(info))
    ceiling = matmul_ceiling(512 if args.smoke else 8192)
    info["matmul_tflops"] = ceiling / 1e12
    log(f"bf16 matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s")
    os.makedirs(args.out, exist_ok=True)
    stem = "prefill_attention" + (f"_{args.tag}" if args.tag else "")
    if args.check:
        return run_check(args, backend, interpret, (bs, rbs, fbs), info, log, os.path.join(args.out, stem + "_check.json"))
    if args.tune:
        tune_deadline = start + (args.tune_budget_s or args.budget_s)
        info["tune"], info["tuned"], best = run_tune(args, backend, interpret, tune_deadline, log)
        bs, rbs, fbs = best.get("window", bs), best.get("rows", rbs), best.get("far", fbs)
        log(f"tuned: {json.dumps(info['tuned'])}")
        with open(os.path.join(args.out, stem + "_tune.json"), "w") as f:
            json.dump(info, f, indent=1)
        if not args.bench_lens:
            return info
        args.lens = [int(x) for x in args.bench_lens.split(",")]
    info["block_sizes"] = dataclasses.asdict(bs)
    info["rows_block_sizes"] = dataclasses.asdict(rbs)
    info["far_block_sizes"] = dataclasses.asdict(fbs)
    info["check"] = spot_check(args, backend, interpret, bs, rbs, fbs) if not args.no_check else {}
    log(f"spot check (rel. error vs reference, T={args.check_len}): {json.dumps(info['check'], indent=1)}")
    info["results"] = run_benchmark(args, backend, interpret, bs, deadline, log, rbs, fbs)
    info["elapsed_s"] = time.time() - start
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    plot(info["results"], os.path.join(args.out, stem + ".png"))
    print_table(info["results"], ceiling)
    return info


if __name__ == "__main__":
    main()

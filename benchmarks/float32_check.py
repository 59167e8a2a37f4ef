"""Every prefill method compiles and runs in float32 and in bfloat16, through the entry point the model
calls per layer (`delta_jax.attention.prefill`), at Llama-3.1-8B attention widths: float32 against a
float32 dense-mask reference, bfloat16 against float32. Two right-padded sequences of different lengths.

    PYTHONPATH=. python benchmarks/float32_check.py              # GPU: T 2048, window 512, sinks 16, gamma 64
    PYTHONPATH=. python benchmarks/float32_check.py --smoke      # CPU, tiny

Writes float32_check[_TAG].json to --out; exits 1 if a method fails to compile, run or match.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax import attention  # noqa: E402
from delta_jax.config import PrefillConfig  # noqa: E402
from pallas_kernels import sparse_prefill as sp  # noqa: E402
from pallas_kernels.sparse_prefill import reference as ref  # noqa: E402

TOLERANCE = {"float32_vs_reference": 1e-4, "bfloat16_vs_float32": 3e-2}
TIE = 1e-5  # taylor: rows whose two tightest tangent bounds are this close may take either anchor's far output


def configs(window, sinks, gamma):
    return {
        "dense": PrefillConfig(method="dense"),
        "window": PrefillConfig(method="window", window=window, sinks=sinks, gamma=None, tail=0),
        "recompute": PrefillConfig(method="window", window=window, sinks=sinks, gamma=gamma),
        "delta": PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma),
        "taylor": PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma, variant="taylor"),
    }


def reference(name, q, k, v, lengths, cfg):
    """float32 dense-mask reference of a method (NumPy [B, T, H, D]; rows past a length are not compared) and
    the row-heads [B, T, H] not compared (taylor's near-ties of its tangent bounds; None for the others)."""
    L = np.asarray(lengths)
    dense = np.asarray(ref.sparse_attention_reference(q, k, v, window=None, sinks=0))
    if name == "dense":
        return dense, None
    if name == "delta":
        return ref.delta_attention_reference(q, k, v, window=cfg.window, sinks=cfg.sinks, gamma=cfg.gamma,
                                             lengths=L), None
    ties = None
    if name == "taylor":
        out, margin = ref.taylor_reference(q, k, v, window=cfg.window, sinks=cfg.sinks, gamma=cfg.gamma,
                                           lengths=lengths, return_margin=True)
        out, ties = np.array(out), np.asarray(margin) < TIE
    else:
        out = np.array(ref.sparse_attention_reference(q, k, v, window=cfg.window, sinks=cfg.sinks))
    for b, n in enumerate(L):
        exact = list(range(n - sp.tail_rows(int(n), cfg.gamma, cfg.tail), n))
        if name == "recompute":
            exact += list(range(0, n, cfg.gamma))
        out[b, exact] = dense[b, exact]
        if ties is not None:
            ties[b, exact] = False
    return out, ties


def rel_err(got, want, lengths, skip=None):
    """Relative error over the rows below each length, leaving out the row-heads `skip` [B, T, H]."""
    got, want = np.array(got, np.float64), np.asarray(want, np.float64)
    if skip is not None:
        got[skip] = want[skip]
    rows = [(b, slice(0, int(n))) for b, n in enumerate(np.asarray(lengths))]
    num = sum(np.sum((got[b, s] - want[b, s]) ** 2) for b, s in rows)
    den = sum(np.sum(want[b, s] ** 2) for b, s in rows)
    ok = all(np.all(np.isfinite(got[b, s])) for b, s in rows)
    return float(np.sqrt(num / den)) if ok else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--gamma", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", type=str, default=None, help="comma-separated methods to check (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    p.add_argument("--tag", type=str, default="")
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.len, args.window, args.sinks, args.gamma = 400, 48, 8, 16
        args.heads, args.kv_heads, args.head_dim = 4, 2, 64
    T, H, Hkv, D = args.len, args.heads, args.kv_heads, args.head_dim
    info = common.environment()
    info.update(T=T, heads=H, kv_heads=Hkv, head_dim=D, window=args.window, sinks=args.sinks, gamma=args.gamma,
                tiles={name: {kind: str(sp.default_block_sizes(sp.pick_backend(), D, kind, dtype))
                              for kind in sp.KINDS} for name, dtype in (("float32", jnp.float32),
                                                                       ("bfloat16", jnp.bfloat16))},
                tolerance=TOLERANCE, methods={})
    print(info, flush=True)
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q32 = jax.random.normal(ks[0], (2, T, H, D), jnp.float32)
    k32 = jax.random.normal(ks[1], (2, T, Hkv, D), jnp.float32)
    v32 = jax.random.normal(ks[2], (2, T, Hkv, D), jnp.float32)
    lengths = jnp.asarray([T, T - 3 * args.gamma // 2 - 5], jnp.int32)
    failed = []
    wanted = args.methods.split(",") if args.methods else None
    for name, cfg in configs(args.window, args.sinks, args.gamma).items():
        if wanted is not None and name not in wanted:
            continue
        rec, outs = {}, {}
        for dtype in (jnp.float32, jnp.bfloat16):
            dn = jnp.dtype(dtype).name
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            fn = jax.jit(lambda q, k, v, lengths, cfg=cfg: attention.prefill(q, k, v, lengths, cfg))
            try:
                t0 = time.perf_counter()
                compiled = fn.lower(q, k, v, lengths).compile()
                t1 = time.perf_counter()
                outs[dn] = np.asarray(jax.block_until_ready(compiled(q, k, v, lengths)), np.float32)
                rec[dn] = {"compile_s": t1 - t0, "run_s": common.time_fn(compiled, q, k, v, lengths, reps=3, warmup=1)}
            except Exception as e:  # noqa: BLE001
                rec[dn] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                failed.append(f"{name} {dn}: {rec[dn]['error'][:200]}")
        if "float32" in outs:
            with jax.default_matmul_precision("highest"):
                want, ties = reference(name, q32, k32, v32, lengths, cfg)
            rec["float32_vs_reference"] = rel_err(outs["float32"], want, lengths, ties)
            if ties is not None:  # how many row-heads sit at a tie, and the error with them in
                valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
                rec["near_ties"] = int(ties[valid].sum())
                rec["float32_vs_reference_with_ties"] = rel_err(outs["float32"], want, lengths)
        if "float32" in outs and "bfloat16" in outs:
            rec["bfloat16_vs_float32"] = rel_err(outs["bfloat16"], outs["float32"], lengths)
        for key, tol in TOLERANCE.items():
            if key in rec and not rec[key] < tol:
                failed.append(f"{name} {key}: {rec[key]}")
        info["methods"][name] = rec
        print(name, rec, flush=True)
    info["failed"] = failed
    path = common.write_json(info, args.out, "float32_check" + (f"_{args.tag}" if args.tag else "") + ".json")
    print(f"wrote {path}; " + ("all methods passed" if not failed else "FAILED: " + "; ".join(failed)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

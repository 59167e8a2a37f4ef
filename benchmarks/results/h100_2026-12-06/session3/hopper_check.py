"""The one-off GPU check and timing of the Hopper window kernel that wrote hopper_window.json (H100, 2026-12-06);
kept with its output. The benchmark of record is benchmarks/prefill_attention.py (ours_window, ours_window_triton)."""
import sys, time, json, os, traceback, functools
sys.path.insert(0, '.')
import jax, jax.numpy as jnp, numpy as np
from benchmarks import common
from benchmarks.prefill_attention import make_inputs, rel_err
from pallas_kernels import sparse_prefill as sp
from pallas_kernels.sparse_prefill import hopper, reference
out = {"device": jax.devices()[0].device_kind, "cc": getattr(jax.devices()[0], "compute_capability", None), "jax": jax.__version__}
print(out, flush=True)
res = out.setdefault("check", [])
for (T, W, S, G, dt) in [(1024, 256, 64, None, jnp.bfloat16), (1024, 256, 16, 64, jnp.bfloat16), (2048, 2048, 64, None, jnp.float16), (1024, 200, 0, None, jnp.bfloat16)]:
    try:
        q, k, v = make_inputs(T, 1, 32, 8, 128, dt, seed=T + W)
        for blocks in [hopper.HopperBlocks(64, 128, 2), hopper.HopperBlocks(64, 64, 3)]:
            o, l = jax.jit(functools.partial(hopper.attend_window, window=W, sinks=S, gamma=G, blocks=blocks))(q, k, v)
            if G is None:
                ro, rl = reference.sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), window=W, sinks=S, return_lse=True)
            else:
                ro, rl = sp.sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), window=W, sinks=S, gamma=G, backend="xla", return_lse=True)
            r = dict(T=T, window=W, sinks=S, gamma=G, dtype=str(jnp.dtype(dt)), blocks=str(blocks), out=rel_err(o, ro), lse=float(np.nanmax(np.abs(np.asarray(l) - np.asarray(rl)))))
            print(r, flush=True); res.append(r)
    except Exception as e:
        traceback.print_exc(); res.append(dict(T=T, error=repr(e)[:500]))
tim = out.setdefault("time", [])
for T in (32768, 131072):
    q, k, v = make_inputs(T, 1, 32, 8, 128, jnp.bfloat16)
    fns = {
        "cudnn_window": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn", local_window_size=(2047, 0))),
        "ours_triton": jax.jit(lambda q, k, v: sp.sparse_attention(q, k, v, window=2048, sinks=64, backend="gpu")),
    }
    for b in [(64, 128, 2), (64, 64, 3), (64, 64, 4), (64, 128, 3)]:
        fns[f"hopper_{b}"] = jax.jit(functools.partial(hopper.attend_window, window=2048, sinks=64, blocks=hopper.HopperBlocks(*b)))
    for name, fn in fns.items():
        try:
            ms = 1e3 * common.time_fn(fn, q, k, v, reps=10)
            entries = 32 * T * (2048 + 64)
            r = dict(T=T, name=name, ms=ms, tflops=4 * 128 * entries / ms / 1e9)
        except Exception as e:
            r = dict(T=T, name=name, error=repr(e)[:300])
        print(r, flush=True); tim.append(r)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "hopper_window.json"), "w"), indent=1)

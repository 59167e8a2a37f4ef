"""Our window + sinks kernels (Mosaic GPU on Hopper, Triton) beside cuDNN's sliding window, one call each, for
Nsight Compute.

Llama-3.1-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, bf16, batch 1), window 2048, sinks 64
(cuDNN: window only). Each function runs twice (compile, then the profiled launch) with a marker line between;
times with device sync are printed for reference (they include ncu's replay when run under it).

    ncu --clock-control none -k 'regex:(?i)(sparse_prefill|sdpa|fmha|flash)' --launch-skip 0 -c 8 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis --csv --page details \
        python benchmarks/window_profile.py --len 131072 > window_profile.csv
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

from benchmarks.prefill_attention import make_inputs  # noqa: E402
from pallas_kernels import sparse_prefill as sp  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--len", type=int, default=131072)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--one-loop", action="store_true", help="the Triton kernel with BlockSizes.one_loop")
    a = p.parse_args(argv)
    q, k, v = make_inputs(a.len, 1, 32, 8, 128, jnp.bfloat16)
    bs = sp.default_block_sizes("gpu", 128, "sparse", jnp.bfloat16)
    if a.one_loop:
        bs = dataclasses.replace(bs, one_loop=True)
    fns = {
        "cudnn_window": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn", local_window_size=(a.window - 1, 0))),
        "ours_window": jax.jit(lambda q, k, v: sp.sparse_attention(
            q, k, v, window=a.window, sinks=a.sinks, backend="gpu", block_sizes=bs)),
        "ours_window_triton": jax.jit(lambda q, k, v: sp.sparse_attention(
            q, k, v, window=a.window, sinks=a.sinks, backend="gpu", block_sizes=dataclasses.replace(bs, hopper=False))),
    }
    for name, fn in fns.items():
        fn(q, k, v).block_until_ready()
        t0 = time.perf_counter()
        fn(q, k, v).block_until_ready()
        print(f"{name} T={a.len} tiles={bs}: {1e3 * (time.perf_counter() - t0):.2f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Does a sampled row's delta carry over to the rows after it? Per layer and head, on the real model.

Delta Attention adds the correction of a sampled row r, c(r) = dense(r) - sparse(r), to the rows
t = r + d of its block. That helps row t only if ||c(t) - c(t - d)|| < ||c(t)||. For every layer
(teacher-forced by a dense forward pass, so each layer sees dense inputs) this script measures, over
rows whose window misses context, the median relative error ||c(t) - c(t - d)|| / ||c(t)|| and the
fraction of rows the transferred correction helps, for lags d up to gamma; and the far mass
m(t) = 1 - Z_window(t) / Z_dense(t) with its row-to-row change.

Since dense(t) = (1 - m(t)) sparse(t) + m(t) far(t), the correction is c(t) = m(t) far(t) - m(t) sparse(t):
a far term and a local term. The transfer error c(t) - c(t - d) splits the same way; the script reports
the median size of each part relative to ||c(t)||, which tests the hypothesis that the sampled row's
own local term, -m(r) sparse(r), is what fails to transfer.

    python benchmarks/delta_transfer.py --lengths 2048 --samples 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax.attention import dense_prefill  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from delta_jax.eval.corpus import prose  # noqa: E402
from delta_jax.model import rope_frequencies  # noqa: E402
from pallas_kernels import sparse_prefill as pk  # noqa: E402

LAGS = (1, 2, 4, 8, 16, 32, 63)


def layer_stats(engine, ids, window, sinks):
    """Per layer: far mass mean, its mean row-to-row change, and per lag (median rel. error, helped,
    far-term and local-term change)."""
    return jax.device_get(_stats_fn(engine, len(ids), window, sinks)(engine.state, jnp.asarray([ids], jnp.int32)))


@functools.lru_cache(maxsize=None)
def _stats_fn(engine, t, window, sinks):
    """The jit-compiled statistics pass for prompts of `t` tokens (compiled once per length)."""
    from flax import nnx

    @jax.jit
    def run(state, tokens):
        model = nnx.merge(engine.graphdef, state)
        pos = jnp.arange(t)[None]
        inv = rope_frequencies(model.cfg)
        x = model.embed(tokens)
        rows = jnp.arange(window + sinks + max(LAGS), t)
        out = []
        for layer in model.layers:
            q, k, v = layer.attn.qkv(layer.attn_norm(x), pos, inv)
            a = dense_prefill(q, k, v).astype(jnp.float32)
            s, lse_s = pk.sparse_attention(q, k, v, window=window, sinks=sinks, return_lse=True)
            _, lse_d = pk.exact_rows_attention(q, k, v, pos, return_lse=True)
            m = 1 - jnp.exp(lse_s - lse_d)[0].T                                 # [T, H]
            far = m[rows].T                                                    # [H, R]
            c = (a - s.astype(jnp.float32))[0]                                 # [T, H, D]
            local = m[..., None] * s[0].astype(jnp.float32)                    # [T, H, D]: m(t) sparse(t)
            nc = jnp.linalg.norm(c[rows], axis=-1)                             # [R, H]
            per_lag = []
            for d in LAGS:
                rel = lambda x: jnp.linalg.norm(x[rows] - x[rows - d], axis=-1) / (nc + 1e-12)  # noqa: E731
                err = rel(c)
                per_lag.append((jnp.median(err), jnp.mean(err < 1), jnp.median(err, axis=0),
                                jnp.median(rel(c + local)), jnp.median(rel(local))))
            out.append((far.mean(), jnp.abs(jnp.diff(far, axis=1)).mean(), per_lag))
            x = x + layer.attn.out(a.astype(x.dtype))
            x = x + layer.mlp(layer.mlp_norm(x))
        return out

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    engine = Engine.from_pretrained(a.model, dtype="float32", progress=False)
    result = {"env": common.environment(), "window": a.window, "sinks": a.sinks, "lags": LAGS, "lengths": {}}
    for length in (int(x) for x in a.lengths.split(",")):
        per_sample = []
        for i in range(a.samples):
            ids = engine.tokenizer(prose(random.Random(i), length // 6))["input_ids"][:length]
            if len(ids) < length:
                raise ValueError(f"filler text too short for {length} tokens")
            per_sample.append(layer_stats(engine, ids, a.window, a.sinks))
        layers = []
        for li in range(engine.config.num_layers):
            far = float(np.mean([s[li][0] for s in per_sample]))
            dfar = float(np.mean([s[li][1] for s in per_sample]))
            lags = {str(d): {"median_rel_error": float(np.mean([s[li][2][j][0] for s in per_sample])),
                             "helped": float(np.mean([s[li][2][j][1] for s in per_sample])),
                             "per_head_median_rel_error": np.mean([s[li][2][j][2] for s in per_sample], 0).tolist(),
                             "far_term_rel_change": float(np.mean([s[li][2][j][3] for s in per_sample])),
                             "local_term_rel_change": float(np.mean([s[li][2][j][4] for s in per_sample]))}
                    for j, d in enumerate(LAGS)}
            layers.append({"far_mass": far, "far_mass_step": dfar, "lags": lags})
        result["lengths"][str(length)] = layers
        print(f"T={length}: layer far-mass | median rel. error (fraction helped) at lags {LAGS} "
              f"| far / local term change at lag 32")
        for li, lay in enumerate(layers):
            print(f"{li:3d} {lay['far_mass']:.3f} | " + "  ".join(
                f"{lay['lags'][str(d)]['median_rel_error']:.2f}({lay['lags'][str(d)]['helped']:.2f})" for d in LAGS)
                + f" | {lay['lags']['32']['far_term_rel_change']:.2f} / {lay['lags']['32']['local_term_rel_change']:.2f}")
    path = common.write_json(result, a.out, "delta_transfer.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

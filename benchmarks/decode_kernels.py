"""Kernel-level microbenchmark of the DELTA decode kernels, Llama-3.1-8B attention shapes.

Per (context, batch): XLA dense decode (einsum softmax), jax's Pallas GPU `decode_attention`
(gqa on its [B, S, Hkv, D] layout, and mqa over the head-major cache), our dense decode + page
scores, `select_pages`, our sparse decode (budget 64 pages of 16, recent 8), each as the median
time per call with the calls issued back to back inside one jitted program (rotating inputs so
that the sparse pages do not stay in L2). KV bytes read per call are set against the HBM copy
bandwidth measured in the same run. `--check` first compares every kernel on the device with a
float64 NumPy reference; `--sweep` times a few tile settings of our kernels.

    PYTHONPATH=. python3 benchmarks/decode_kernels.py --check --sweep --out DIR   # on the GPU
    PYTHONPATH=. python benchmarks/decode_kernels.py --smoke --out /tmp/dk        # tiny, CPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from pallas_kernels import delta_decode as dd  # noqa: E402
from pallas_kernels.delta_decode import reference as dd_ref  # noqa: E402

PAGE_SIZE, BUDGET, RECENT = 16, 64, 8


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def xla_dense_decode(q, k, v, lengths):
    """Plain einsum-softmax decode attention over the head-major cache (the XLA baseline)."""
    B, hq, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, hkv, hq // hkv, D)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    s = jnp.where(jnp.arange(S)[None, None, None, :] < lengths[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype).reshape(B, hq, D)


def per_call_time(fn, arg_sets, reps):
    """Median seconds per call of `fn(*args)`: the calls over `arg_sets` run back to back in one
    jitted program (each result kept as an output), timed over `reps` launches."""
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    return common.time_fn(many, arg_sets, reps=reps, warmup=1) / len(arg_sets)


def device_kernel_times(fn, arg_sets):
    """Device time per call from a profiler trace of the back-to-back program: the summed
    duration of the GPU kernels (per kernel name) and the span from first start to last end."""
    import glob
    import tempfile
    from jax.profiler import ProfileData
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(many(arg_sets))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        jax.block_until_ready(many(arg_sets))
    pd = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
    n = len(arg_sets)
    per_name, lines, t0, t1 = {}, {}, None, None
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = list(line.events)
            lines[line.name] = len(evs)
            if not line.name.startswith("Stream"):
                continue
            for e in evs:
                per_name[e.name] = per_name.get(e.name, 0) + e.duration_ns
                t0 = e.start_ns if t0 is None else min(t0, e.start_ns)
                t1 = e.end_ns if t1 is None else max(t1, e.end_ns)
    kernels = {k[:90]: v / n / 1e3 for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:12]}
    return dict(kernel_us=sum(per_name.values()) / n / 1e3,
                span_us=(t1 - t0) / n / 1e3 if t0 is not None else None,
                kernels_us=kernels, lines=lines)


# ---------------------------------------------------------------- correctness on the device

def _np_probs(q, k, keep):
    B, hq, D = q.shape
    kk = np.repeat(k, hq // k.shape[1], axis=1)
    s = np.einsum("bhd,bhsd->bhs", q, kk) / math.sqrt(D)
    s = np.where(keep[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_attend(q, k, v, keep):
    return np.einsum("bhs,bhsd->bhd", _np_probs(q, k, keep), np.repeat(v, q.shape[1] // v.shape[1], axis=1))


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _rel(x, ref):
    x = _f64(x)
    return float("nan") if not np.all(np.isfinite(x)) else float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


CHECK_VARIANTS = {"default": None,
                  "xla_combine": dd.BlockSizes(combine_in_kernel=False),
                  "ppb16_w8_splits1": dd.BlockSizes(block_k=64, pages_per_block=16, num_splits=1, num_warps=8)}


def check(backend, interpret, smoke):
    """Every kernel against float64 NumPy; returns a list of result dicts."""
    rows = []
    for variant, bs in CHECK_VARIANTS.items():
        if smoke and variant != "default":
            continue
        try:
            rows += _check(backend, interpret, smoke, variant, bs)
        except Exception as e:  # record it and check the other variants
            traceback.print_exc()
            rows.append(dict(variant=variant, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def _check(backend, interpret, smoke, variant, bs):
    rows = []
    S = 256 if smoke else 4096
    cases = [(2, 1, 64, jnp.float32)] if smoke else [
        (32, 8, 128, jnp.bfloat16), (32, 8, 128, jnp.float32), (16, 2, 64, jnp.bfloat16), (3, 1, 64, jnp.float32)]
    budget = 4 if smoke else BUDGET
    recent = 1 if smoke else RECENT
    for hq, hkv, D, dtype in cases:
        keys = jax.random.split(jax.random.PRNGKey(hq * 7 + D), 3)
        B = 3
        q = _rand(keys[0], (B, hq, D), dtype) * 1.5
        k, v = _rand(keys[1], (B, hkv, S, D), dtype), _rand(keys[2], (B, hkv, S, D), dtype)
        lengths = jnp.asarray([S // 3 + 5, S - 7, budget * PAGE_SIZE // 2 + 3], jnp.int32)
        qd, kd, vd, ln = _f64(q), _f64(k), _f64(v), np.asarray(lengths)
        keep = np.arange(S)[None, :] < ln[:, None]
        p = _np_probs(qd, kd, keep)
        ref_scores = p.max(axis=1).reshape(B, -1, PAGE_SIZE).sum(-1)
        out, scores = dd.decode_attention_with_page_scores(q, k, v, lengths, page_size=PAGE_SIZE,
                                                           backend=backend, block_sizes=bs,
                                                           interpret=interpret)
        idx, valid = dd.select_pages(scores, lengths, page_size=PAGE_SIZE, budget=budget, recent=recent)
        ridx, rvalid = dd_ref.select_pages_reference(scores, lengths, page_size=PAGE_SIZE,
                                                           budget=budget, recent=recent)
        tied = jnp.round(scores * 4) / 4  # many ties
        tidx, tvalid = dd.select_pages(tied, lengths, page_size=PAGE_SIZE, budget=budget, recent=recent)
        rtidx, rtvalid = dd_ref.select_pages_reference(tied, lengths, page_size=PAGE_SIZE,
                                                             budget=budget, recent=recent)
        sp = dd.sparse_decode_attention(q, k, v, idx, valid, lengths, page_size=PAGE_SIZE,
                                        backend=backend, block_sizes=bs, interpret=interpret)
        skeep = np.zeros_like(keep)
        for b in range(B):
            for pg, ok in zip(np.asarray(idx[b]), np.asarray(valid[b])):
                if ok:
                    skeep[b, pg * PAGE_SIZE:(pg + 1) * PAGE_SIZE] = True
        skeep &= keep
        ref_scores_err = float(np.max(np.abs(_f64(scores) - ref_scores)) / np.max(ref_scores))
        row = dict(variant=variant, q_heads=hq, kv_heads=hkv, head_dim=D, dtype=jnp.dtype(dtype).name, max_seq=S,
                   dense_rel_err=_rel(out, _np_attend(qd, kd, vd, keep)),
                   page_scores_max_err=ref_scores_err,
                   select_equal=bool(np.array_equal(np.asarray(idx), np.asarray(ridx))
                                     and np.array_equal(np.asarray(valid), np.asarray(rvalid))),
                   select_ties_equal=bool(np.array_equal(np.asarray(tidx), np.asarray(rtidx))
                                          and np.array_equal(np.asarray(tvalid), np.asarray(rtvalid))),
                   sparse_rel_err=_rel(sp, _np_attend(qd, kd, vd, skeep)))
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        row["ok"] = bool(row["dense_rel_err"] <= tol and row["sparse_rel_err"] <= tol
                         and row["page_scores_max_err"] <= 1e-4 and row["select_equal"]
                         and row["select_ties_equal"])
        print("check", row, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- timing

def bench_shape(ctx, B, hq, hkv, D, dtype, backend, interpret, reps, n_calls, sweep, smoke):
    rows = []
    S = ctx
    itemsize = jnp.dtype(dtype).itemsize
    keys = jax.random.split(jax.random.PRNGKey(ctx + B), 8)
    k, v = _rand(keys[0], (B, hkv, S, D), dtype), _rand(keys[1], (B, hkv, S, D), dtype)
    lengths = jnp.full((B,), ctx, jnp.int32)
    qs = [_rand(jax.random.fold_in(keys[2], i), (B, hq, D), dtype) for i in range(n_calls)]
    dense_bytes = 2 * B * hkv * ctx * D * itemsize
    base = dict(context=ctx, batch=B)

    def add(name, t, nbytes, **extra):
        row = dict(base, method=name, ms=t * 1e3, kv_bytes=nbytes, **extra)
        rows.append(row)
        print("time", row, flush=True)

    def attempt(name, thunk):
        try:
            thunk()
        except Exception as e:  # record and go on: one failing variant must not stop the run
            print(f"FAILED {name} ctx={ctx} B={B}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            rows.append(dict(base, method=name, error=f"{type(e).__name__}: {str(e)[:300]}"))

    sets = [(q, k, v, lengths) for q in qs]
    attempt("xla_dense", lambda: add("xla_dense", per_call_time(xla_dense_decode, sets, reps), dense_bytes))

    from jax.experimental.pallas.ops.gpu import decode_attention as jda

    def jax_pallas():
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        f = lambda q, kk, vv, ln: jda.gqa(q, kk, vv, kv_seq_len=ln, interpret=interpret)
        add("jax_pallas_gqa", per_call_time(f, [(q, kt, vt, lengths) for q in qs], reps), dense_bytes,
            note="includes gqa's own transpose of k/v to head-major")
        del kt, vt
        G = hq // hkv

        def mqa(q, kk, vv, ln):
            o = jda.mqa(q.reshape(B * hkv, G, D), kk.reshape(B * hkv, S, D), vv.reshape(B * hkv, S, D),
                        kv_seq_len=jnp.repeat(ln, hkv), interpret=interpret)
            return o.reshape(B, hq, D)
        add("jax_pallas_mqa_headmajor", per_call_time(mqa, sets, reps), dense_bytes)

    attempt("jax_pallas", jax_pallas)

    def ours_dense(bs=None, name="delta_dense_scores", be=backend):
        f = lambda q, kk, vv, ln: dd.decode_attention_with_page_scores(
            q, kk, vv, ln, page_size=PAGE_SIZE, backend=be, block_sizes=bs, interpret=interpret)
        extra = {} if bs is None else dict(block_sizes=str(bs))
        add(name, per_call_time(f, sets, reps), dense_bytes, **extra)

    attempt("delta_dense_scores", ours_dense)
    if backend != "xla":
        attempt("delta_dense_scores_xla", lambda: ours_dense(name="delta_dense_scores_xla", be="xla"))
    if sweep and backend == "gpu":
        for label, bs in (("bk64", dd.BlockSizes(block_k=64)),
                          ("xla_combine", dd.BlockSizes(combine_in_kernel=False))):
            attempt(f"dense {label}", lambda bs=bs, label=label: ours_dense(bs, f"delta_dense_scores {label}"))

    # Selection and sparse decode: a different random page selection per call.
    P = S // PAGE_SIZE
    budget = min(BUDGET, P)
    score_sets = [(jax.random.uniform(jax.random.fold_in(keys[3], i), (B, P)), lengths) for i in range(n_calls)]
    sel = lambda sc, ln: dd.select_pages(sc, ln, page_size=PAGE_SIZE, budget=budget, recent=RECENT)
    attempt("select_pages", lambda: add("select_pages", per_call_time(sel, score_sets, reps), 0))
    selections = [sel(*a) for a in score_sets]
    n_valid = np.asarray(jnp.sum(selections[0][1]))
    sparse_bytes = int(2 * hkv * n_valid * PAGE_SIZE * D * itemsize)
    ssets = [(q, k, v, i, vl, lengths) for q, (i, vl) in zip(qs, selections)]

    def ours_sparse(bs=None, name="delta_sparse", be=backend, arg_sets=ssets, nbytes=sparse_bytes):
        f = lambda q, kk, vv, i, vl, ln: dd.sparse_decode_attention(
            q, kk, vv, i, vl, ln, page_size=PAGE_SIZE, backend=be, block_sizes=bs, interpret=interpret)
        extra = {} if bs is None else dict(block_sizes=str(bs))
        add(name, per_call_time(f, arg_sets, reps), nbytes, **extra)

    attempt("delta_sparse", ours_sparse)
    if backend != "xla":
        attempt("delta_sparse_xla", lambda: ours_sparse(name="delta_sparse_xla", be="xla"))
    if sweep and backend == "gpu":
        for label, bs in (("xla_combine", dd.BlockSizes(combine_in_kernel=False)),
                          ("ppb16", dd.BlockSizes(pages_per_block=16)),
                          ("ppb8 w8", dd.BlockSizes(pages_per_block=8, num_warps=8)),
                          ("ppb16 w8", dd.BlockSizes(pages_per_block=16, num_warps=8)),
                          ("ppb4", dd.BlockSizes(pages_per_block=4)),
                          ("ppb16 splits1", dd.BlockSizes(pages_per_block=16, num_splits=1)),
                          ("ppb8 splits2", dd.BlockSizes(pages_per_block=8, num_splits=2))):
            attempt(f"sparse {label}", lambda bs=bs, label=label: ours_sparse(bs, f"delta_sparse {label}"))
        # A larger selection (1024 pages = 16K tokens): the kernel's streaming rate.
        big = min(1024, P)
        bsets = []
        for i, (sc, ln) in enumerate(score_sets):
            bi, bv = dd.select_pages(sc, ln, page_size=PAGE_SIZE, budget=big, recent=RECENT)
            bsets.append((qs[i], k, v, bi, bv, ln))
        nb = int(2 * hkv * np.asarray(jnp.sum(bsets[0][4])) * PAGE_SIZE * D * itemsize)
        attempt("delta_sparse budget1024",
                lambda: ours_sparse(name=f"delta_sparse budget{big}", arg_sets=bsets, nbytes=nb))
    if sweep and backend == "gpu":
        def prof(name, fn, arg_sets):
            r = device_kernel_times(fn, arg_sets)
            rows.append(dict(base, method="profile " + name, **r))
            print("profile", name, ctx, B, {k: r[k] for k in ("kernel_us", "span_us")}, r["kernels_us"],
                  flush=True)
        sp = lambda q, kk, vv, i, vl, ln: dd.sparse_decode_attention(q, kk, vv, i, vl, ln, page_size=PAGE_SIZE)
        de = lambda q, kk, vv, ln: dd.decode_attention_with_page_scores(q, kk, vv, ln, page_size=PAGE_SIZE)
        attempt("profile sparse", lambda: prof("delta_sparse", sp, ssets))
        attempt("profile select", lambda: prof("select_pages", sel, score_sets))
        attempt("profile dense", lambda: prof("delta_dense_scores", de, sets))
    return rows


def table(rows, bw):
    lines = [f"{'context':>8} {'batch':>5} {'method':<34} {'ms':>9} {'KV MB':>9} {'GB/s':>8} {'%copy':>6}"]
    for r in rows:
        if r["method"].startswith("profile"):
            lines.append(f"{r['context']:>8} {r['batch']:>5} {r['method']:<34} device kernels "
                         f"{r.get('kernel_us', 0):.1f} us/call, span {r.get('span_us') or 0:.1f} us/call")
            continue
        if "ms" not in r:
            lines.append(f"{r['context']:>8} {r['batch']:>5} {r['method']:<34} {'ERROR':>9}")
            continue
        gbs = r["kv_bytes"] / (r["ms"] * 1e-3) / 1e9 if r["kv_bytes"] else 0.0
        frac = f"{100 * gbs * 1e9 / bw:5.1f}" if bw and r["kv_bytes"] else "     -"
        lines.append(f"{r['context']:>8} {r['batch']:>5} {r['method']:<34} {r['ms']:9.4f} "
                     f"{r['kv_bytes'] / 1e6:9.2f} {gbs:8.1f} {frac:>6}")
    return "\n".join(lines)


def plot(rows, bw, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    main = ["xla_dense", "jax_pallas_gqa", "jax_pallas_mqa_headmajor", "delta_dense_scores",
            "select_pages", "delta_sparse"]
    shapes = sorted({(r["context"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(main)
    for i, m in enumerate(main):
        ts, fr = [], []
        for s in shapes:
            r = next((r for r in rows if (r["context"], r["batch"]) == s and r["method"] == m and "ms" in r), None)
            ts.append(r["ms"] if r else 0)
            fr.append(100 * r["kv_bytes"] / (r["ms"] * 1e-3) / bw if r and bw and r["kv_bytes"] else 0)
        xs = np.arange(len(shapes)) + i * width
        axes[0].bar(xs, ts, width, label=m)
        axes[1].bar(xs, fr, width, label=m)
    for ax, title in ((axes[0], "time per call (ms, log)"), (axes[1], "KV bytes / time, % of copy bandwidth")):
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{c // 1024}K b{b}" for c, b in shapes])
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=16, help="calls per timed program (rotating inputs)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--check", action="store_true", help="compare the kernels with float64 NumPy first")
    ap.add_argument("--sweep", action="store_true", help="time a few tile settings of our kernels")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Pallas in interpret mode)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip shapes not started before this")
    a = ap.parse_args(argv)
    t0 = time.time()
    platform = jax.default_backend()
    on_gpu = platform in ("gpu", "cuda")
    backend = "gpu" if on_gpu or a.smoke else "xla"  # smoke: the gpu kernels in interpret mode
    interpret = not on_gpu
    if a.smoke:
        contexts, batches, hq, hkv, D, dtype = [512], [1, 2], 8, 2, 64, jnp.float32
        reps, calls = 2, 2
    else:
        contexts = [int(x) for x in a.contexts.split(",")]
        batches = [int(x) for x in a.batches.split(",")]
        hq, hkv, D, dtype, reps, calls = 32, 8, 128, jnp.bfloat16, a.reps, a.calls
    result = dict(env=common.environment(), backend=backend, interpret=interpret,
                  shapes=dict(q_heads=hq, kv_heads=hkv, head_dim=D, dtype=jnp.dtype(dtype).name,
                              page_size=PAGE_SIZE, budget=BUDGET, recent=RECENT, calls_per_program=calls))
    name = "decode_kernels_smoke.json" if a.smoke else "decode_kernels.json"
    if a.check:
        result["check"] = check(backend, interpret, a.smoke)
        common.write_json(result, a.out, name)
    bw = None if a.smoke else common.hbm_bandwidth()
    result["hbm_copy_bytes_per_s"] = bw
    print("hbm copy bandwidth (read + write) GB/s:", bw and bw / 1e9, flush=True)
    rows = []
    for ctx in contexts:
        for B in batches:
            if time.time() - t0 > a.deadline_s:
                print(f"deadline: skipping ctx={ctx} B={B}", flush=True)
                continue
            rows += bench_shape(ctx, B, hq, hkv, D, dtype, backend, interpret, reps, calls, a.sweep, a.smoke)
            result["rows"] = rows
            common.write_json(result, a.out, name)
    png = plot(rows, bw, os.path.join(a.out, name.replace(".json", ".png")))
    result["plot"] = png
    path = common.write_json(result, a.out, name)
    print(f"wrote {path} {png or '(no plot)'} in {time.time() - t0:.0f} s")
    if "check" in result:
        print("check ok:", all(r["ok"] for r in result["check"]))
    print(table(rows, bw))


if __name__ == "__main__":
    main()

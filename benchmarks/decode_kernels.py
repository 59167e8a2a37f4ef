"""Kernel-level benchmark of the paged DELTA decode kernels, Llama-3.1-8B attention shapes.

Per (context, batch), on one fragmented page pool (the pages of every sequence shuffled over the
pool) and the same queries: our paged dense decode (scores None and "pages"), `select_pages`, our
paged sparse decode (budget 64 pages of 16, recent 8), jax's Pallas GPU `paged_attention` on the
same pool and page table, jax's Pallas GPU `decode_attention` (mqa over the same tokens copied to
a contiguous head-major cache), and the bandwidth bounds: KV bytes read / the copy bandwidth
measured in the same run. Each time is the median per call with `--calls` calls back to back in
one jitted program (rotating queries and page selections, so that the sparse pages do not stay in
L2). `--check` first compares our kernels on the device with `reference.py` (contiguous cache)
on small fragmented pools; `--sweep` times a few tile settings of ours; `--profile` adds device
kernel times from a profiler trace.

    PYTHONPATH=. python benchmarks/decode_kernels.py --check --out DIR      # GPU: < 4 min on an H200
    PYTHONPATH=. python benchmarks/decode_kernels.py --smoke --out /tmp/dk  # tiny, CPU (interpret mode)
"""

from __future__ import annotations

import argparse
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
from pallas_kernels.delta_decode import reference  # noqa: E402

PAGE_SIZE, BUDGET, RECENT = 16, 64, 8


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def fragmented_pool(key, batch, kv_heads, pages_per_seq, head_dim, dtype, spare=0):
    """k/v_pages [kv_heads, batch * pages_per_seq + spare, PAGE_SIZE, head_dim] and a page table
    [batch, pages_per_seq] that scatters every sequence over the whole pool (a random permutation)."""
    kk, kv, kt = jax.random.split(key, 3)
    P = batch * pages_per_seq + spare
    shape = (kv_heads, P, PAGE_SIZE, head_dim)
    table = jax.random.permutation(kt, P)[:batch * pages_per_seq].reshape(batch, pages_per_seq)
    return _rand(kk, shape, dtype), _rand(kv, shape, dtype), table.astype(jnp.int32)


@jax.jit
def contiguous(pages, page_table):
    """The same tokens in a head-major contiguous cache [batch, kv_heads, pages_per_seq * page_size, D]."""
    hkv, _, ps, D = pages.shape
    B, pps = page_table.shape
    return jnp.swapaxes(pages[:, page_table], 0, 1).reshape(B, hkv, pps * ps, D)


def per_call_time(fn, arg_sets, reps):
    """Median seconds per call of `fn(*args)`: the calls over `arg_sets` run back to back in one
    jitted program (each result kept as an output), timed over `reps` launches."""
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    return common.time_fn(many, arg_sets, reps=reps, warmup=1) / len(arg_sets)


def device_kernel_times(fn, arg_sets):
    """Device time per call from a profiler trace of the back-to-back program: the summed duration
    of the GPU kernels (the 12 largest by name) and the span from the first start to the last end."""
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
    per_name, t0, t1 = {}, None, None
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for e in line.events:
                per_name[e.name] = per_name.get(e.name, 0) + e.duration_ns
                t0 = e.start_ns if t0 is None else min(t0, e.start_ns)
                t1 = e.end_ns if t1 is None else max(t1, e.end_ns)
    kernels = {k[:90]: v / n / 1e3 for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:12]}
    return dict(kernel_us=sum(per_name.values()) / n / 1e3,
                span_us=(t1 - t0) / n / 1e3 if t0 is not None else None, kernels_us=kernels)


# ---------------------------------------------------------------- correctness on the device

def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float("nan") if not np.all(np.isfinite(x)) else float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(backend, interpret, smoke):
    """Our paged kernels against reference.py on fragmented pools (ragged lengths, an empty slot);
    default tiles on every case and, off smoke, two other tile settings on the first (Llama bf16).
    -> list of result dicts."""
    variants = {"default": None}
    if not smoke:
        variants.update(xla_combine=dd.BlockSizes(combine_in_kernel=False),
                        ppb4_splits1_w8=dd.BlockSizes(pages_per_block=4, num_splits=1, num_warps=8))
    cases = [(8, 2, 64, jnp.float32)] if smoke else [
        (32, 8, 128, jnp.bfloat16), (32, 8, 128, jnp.float32), (16, 2, 64, jnp.bfloat16), (3, 1, 64, jnp.float32)]
    pps = 16 if smoke else 257  # 257: not a multiple of any pages_per_block
    budget, recent = (4, 1) if smoke else (BUDGET, RECENT)
    rows = []
    for variant, bs in variants.items():
        for hq, hkv, D, dtype in (cases if bs is None else cases[:1]):
            try:
                rows.append(_check_case(variant, bs, hq, hkv, D, dtype, pps, budget, recent, backend, interpret))
            except Exception as e:  # record it and check the others
                traceback.print_exc()
                rows.append(dict(variant=variant, q_heads=hq, kv_heads=hkv, head_dim=D, dtype=jnp.dtype(dtype).name,
                                 ok=False, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print("check", rows[-1], flush=True)
    return rows


def _check_case(variant, bs, hq, hkv, D, dtype, pps, budget, recent, backend, interpret):
    B = 4
    key = jax.random.PRNGKey(hq * 7 + D)
    k_pages, v_pages, table = fragmented_pool(key, B, hkv, pps, D, dtype, spare=7)
    q = _rand(jax.random.fold_in(key, 1), (B, hq, D), dtype) * 1.5
    S = pps * PAGE_SIZE
    lengths = jnp.asarray([S // 3 + 5, 0, S, budget * PAGE_SIZE // 2 + 3], jnp.int32)
    kc, vc = contiguous(k_pages, table), contiguous(v_pages, table)
    kw = dict(backend=backend, block_sizes=bs, interpret=interpret)
    out_none = dd.paged_decode_attention(q, k_pages, v_pages, table, lengths, **kw)
    out, scores = dd.paged_decode_attention(q, k_pages, v_pages, table, lengths, scores="pages", **kw)
    _, tmax = dd.paged_decode_attention(q, k_pages, v_pages, table, lengths, scores="tokens", **kw)
    idx, valid = dd.select_pages(scores, lengths, page_size=PAGE_SIZE, budget=budget, recent=recent)
    idx2, valid2 = dd.select_pages(scores, lengths, page_size=PAGE_SIZE, budget=budget, recent=recent, topk_chunk=64)
    sparse = dd.paged_sparse_decode_attention(q, k_pages, v_pages, table, idx, valid, lengths, **kw)
    ref = reference.dense_decode_reference(q, kc, vc, lengths)
    ref_scores = np.asarray(reference.page_scores_reference(q, kc, lengths, PAGE_SIZE))
    ref_tmax = np.asarray(reference.token_maxima_reference(q, kc, lengths))
    ridx, rvalid = reference.select_pages_reference(scores, lengths, page_size=PAGE_SIZE, budget=budget,
                                                    recent=recent)
    row = dict(variant=variant, q_heads=hq, kv_heads=hkv, head_dim=D, dtype=jnp.dtype(dtype).name, max_seq=S,
               dense_rel_err=max(_rel(out_none, ref), _rel(out, ref)),
               page_scores_max_err=float(np.max(np.abs(np.asarray(scores) - ref_scores)) / np.max(ref_scores)),
               token_max_err=float(np.max(np.abs(np.asarray(tmax) - ref_tmax)) / np.max(ref_tmax)),
               select_equal=bool(np.array_equal(idx, ridx) and np.array_equal(valid, rvalid)
                                 and np.array_equal(idx2, ridx) and np.array_equal(valid2, rvalid)),
               sparse_rel_err=_rel(sparse, reference.sparse_decode_reference(q, kc, vc, idx, valid, lengths,
                                                                             PAGE_SIZE)),
               empty_slot_zero=bool(np.all(np.asarray(out_none)[1] == 0) and np.all(np.asarray(sparse)[1] == 0)))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    row["ok"] = bool(row["dense_rel_err"] <= tol and row["sparse_rel_err"] <= tol and row["page_scores_max_err"] <= 1e-4
                     and row["token_max_err"] <= 1e-4 and row["select_equal"] and row["empty_slot_zero"])
    return row


# ---------------------------------------------------------------- timing

RAGGED = (1, 2, 4, 4)  # --ragged: row i holds context // RAGGED[i % 4] tokens


def row_lengths(ctx, B, ragged):
    """Tokens per row: all `ctx`, or (ragged) ctx, ctx/2, ctx/4, ctx/4 repeating, a serving batch's mix."""
    return [ctx // RAGGED[i % len(RAGGED)] if ragged else ctx for i in range(B)]


def bench_shape(ctx, B, hq, hkv, D, dtype, backend, interpret, reps, n_calls, bw, sweep, profile, ragged=False,
                splits=()):
    rows = []
    pps = ctx // PAGE_SIZE
    itemsize = jnp.dtype(dtype).itemsize
    key = jax.random.PRNGKey(ctx + B)
    k_pages, v_pages, table = fragmented_pool(key, B, hkv, pps, D, dtype)
    lens = row_lengths(ctx, B, ragged)
    lengths = jnp.asarray(lens, jnp.int32)
    qs = [_rand(jax.random.fold_in(key, 100 + i), (B, hq, D), dtype) for i in range(n_calls)]
    dense_bytes = 2 * sum(lens) * hkv * D * itemsize
    base = dict(context=ctx, batch=B, ragged=bool(ragged))

    def add(name, t, nbytes, **extra):
        row = dict(base, method=name, ms=t * 1e3, kv_bytes=nbytes, **extra)
        rows.append(row)
        print("time", row, flush=True)

    def attempt(name, thunk):
        try:
            thunk()
        except Exception as e:  # record and go on: one failing method must not stop the run
            print(f"FAILED {name} ctx={ctx} B={B}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            rows.append(dict(base, method=name, error=f"{type(e).__name__}: {str(e)[:300]}"))

    from jax.experimental.pallas.ops.gpu import decode_attention as jda
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    def jax_decode_attention():
        kc = contiguous(k_pages, table).reshape(B * hkv, ctx, D)
        vc = contiguous(v_pages, table).reshape(B * hkv, ctx, D)
        G = hq // hkv

        def mqa(q, kk, vv, ln):
            o = jda.mqa(q.reshape(B * hkv, G, D), kk, vv, kv_seq_len=jnp.repeat(ln, hkv), interpret=interpret)
            return o.reshape(B, hq, D)
        add("jax_decode_attention", per_call_time(mqa, [(q, kc, vc, lengths) for q in qs], reps), dense_bytes,
            note="mqa over the tokens copied to a contiguous head-major cache")

    attempt("jax_decode_attention", jax_decode_attention)

    sets = [(q, k_pages, v_pages, table, lengths) for q in qs]
    paged = lambda q, kp, vp, t, ln: jpa.paged_attention(q, kp, vp, t, ln, interpret=interpret)
    attempt("jax_paged_attention", lambda: add("jax_paged_attention", per_call_time(paged, sets, reps), dense_bytes))

    def ours_dense(name, scores, bs=None):
        f = lambda q, kp, vp, t, ln: dd.paged_decode_attention(q, kp, vp, t, ln, scores=scores, backend=backend,
                                                               block_sizes=bs, interpret=interpret)
        add(name, per_call_time(f, sets, reps), dense_bytes, **({} if bs is None else dict(block_sizes=str(bs))))

    attempt("delta_dense", lambda: ours_dense("delta_dense", None))
    attempt("delta_dense_scores", lambda: ours_dense("delta_dense_scores", "pages"))
    for n in splits:
        attempt(f"delta_dense splits{n}",
                lambda n=n: ours_dense(f"delta_dense splits{n}", None, dd.BlockSizes(num_splits=n)))
    if sweep:
        for label, bs in (("ppb4", dd.BlockSizes(pages_per_block=4)), ("ppb16 stages1", dd.BlockSizes(pages_per_block=16, num_stages=1)),
                          ("w8", dd.BlockSizes(num_warps=8)), ("xla_combine", dd.BlockSizes(combine_in_kernel=False))):
            attempt(f"delta_dense {label}", lambda label=label, bs=bs: ours_dense(f"delta_dense {label}", None, bs))

    # Selection and sparse decode: a different random page selection per call.
    budget = min(BUDGET, pps)
    score_sets = [(jax.random.uniform(jax.random.fold_in(key, 200 + i), (B, pps)), lengths) for i in range(n_calls)]
    sel = lambda sc, ln: dd.select_pages(sc, ln, page_size=PAGE_SIZE, budget=budget, recent=RECENT)
    attempt("select_pages", lambda: add("select_pages", per_call_time(sel, score_sets, reps), 0))
    one = lambda sc, ln: dd.select_pages(sc, ln, page_size=PAGE_SIZE, budget=budget, recent=RECENT, topk_chunk=0)
    attempt("select_pages one top_k", lambda: add("select_pages one top_k", per_call_time(one, score_sets, reps), 0))
    selections = [sel(*a) for a in score_sets]
    sparse_bytes = 2 * sum(min(n, budget * PAGE_SIZE) for n in lens) * hkv * D * itemsize
    ssets = [(q, k_pages, v_pages, table, i, v, lengths) for q, (i, v) in zip(qs, selections)]

    def ours_sparse(name, bs=None):
        f = lambda q, kp, vp, t, i, v, ln: dd.paged_sparse_decode_attention(
            q, kp, vp, t, i, v, ln, backend=backend, block_sizes=bs, interpret=interpret)
        add(name, per_call_time(f, ssets, reps), sparse_bytes, **({} if bs is None else dict(block_sizes=str(bs))))

    attempt("delta_sparse", lambda: ours_sparse("delta_sparse"))
    if sweep:
        for label, bs in (("ppb4", dd.BlockSizes(pages_per_block=4)), ("ppb16 stages1", dd.BlockSizes(pages_per_block=16, num_stages=1)),
                          ("splits1", dd.BlockSizes(num_splits=1)), ("w8", dd.BlockSizes(num_warps=8))):
            attempt(f"delta_sparse {label}", lambda label=label, bs=bs: ours_sparse(f"delta_sparse {label}", bs))
    if bw:
        add("bound dense (KV bytes / copy bw)", dense_bytes / bw, dense_bytes)
        add(f"bound sparse ({budget} pages)", sparse_bytes / bw, sparse_bytes)
    if profile:
        def prof(name, fn, arg_sets):
            r = device_kernel_times(fn, arg_sets)
            rows.append(dict(base, method="profile " + name, **r))
            print("profile", name, ctx, B, r, flush=True)
        attempt("profile delta_dense", lambda: prof("delta_dense", lambda q, kp, vp, t, ln: dd.paged_decode_attention(
            q, kp, vp, t, ln, backend=backend, interpret=interpret), sets))
        attempt("profile delta_sparse", lambda: prof("delta_sparse", lambda q, kp, vp, t, i, v, ln:
                                                     dd.paged_sparse_decode_attention(q, kp, vp, t, i, v, ln,
                                                                                      backend=backend,
                                                                                      interpret=interpret), ssets))
    return rows


def table(rows):
    bounds = {}
    for r in rows:
        if r["method"].startswith("bound"):
            bounds[(r["context"], r["batch"], r["method"].split()[1])] = r["ms"]
    lines = [f"{'context':>8} {'batch':>5} {'method':<36} {'ms':>9} {'KV MB':>9} {'GB/s':>8} {'%bound':>7}"]
    for r in rows:
        head = f"{r['context']:>8} {r['batch']:>5} {r['method']:<36}"
        if r["method"].startswith("profile"):
            lines.append(f"{head} device kernels {r.get('kernel_us', 0):.1f} us/call, span {r.get('span_us') or 0:.1f}")
            continue
        if "ms" not in r:
            lines.append(f"{head} {'ERROR':>9}")
            continue
        gbs = r["kv_bytes"] / (r["ms"] * 1e-3) / 1e9
        bound = bounds.get((r["context"], r["batch"], "sparse" if "sparse" in r["method"] else "dense"))
        frac = f"{100 * bound / r['ms']:6.1f}" if bound and r["kv_bytes"] else "     -"
        lines.append(f"{head} {r['ms']:9.4f} {r['kv_bytes'] / 1e6:9.2f} {gbs:8.1f} {frac:>7}")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = [m for m in ("jax_decode_attention", "jax_paged_attention", "delta_dense", "delta_dense_scores",
                           "select_pages", "delta_sparse")
               if any(r["method"] == m and "ms" in r for r in rows)]
    shapes = sorted({(r["context"], r["batch"]) for r in rows})
    if not shapes or not methods:
        return None
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = np.arange(len(shapes)) + i * width
        ts = [next((r["ms"] for r in rows if (r["context"], r["batch"]) == s and r["method"] == m and "ms" in r), 0)
              for s in shapes]
        ax.bar(xs, ts, width, label=m)
        if m == "select_pages":
            continue
        kind = "sparse" if "sparse" in m else "dense"
        for x, s in zip(xs, shapes):  # the method's bound as a line over its bar
            t = next((r["ms"] for r in rows if (r["context"], r["batch"]) == s
                      and r["method"].startswith("bound " + kind)), None)
            if t:
                ax.hlines(t, x - width / 2, x + width / 2, colors="k")
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{c / 1024:g}K b{b}" for c, b in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("ms per call")
    ax.set_title("paged decode attention, fragmented pool (black lines: KV bytes / measured copy bandwidth)")
    ax.legend(fontsize=7)
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
    ap.add_argument("--check", action="store_true", help="compare our kernels with reference.py first")
    ap.add_argument("--sweep", action="store_true", help="time a few tile settings of our kernels")
    ap.add_argument("--profile", action="store_true", help="device kernel times of ours from a profiler trace")
    ap.add_argument("--ragged", action="store_true",
                    help="rows of context, context/2, context/4, context/4 tokens repeating (a serving batch)")
    ap.add_argument("--splits", default="", help="also time our dense kernel with these num_splits (comma list)")
    ap.add_argument("--name", default="decode_kernels")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Pallas in interpret mode)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip shapes not started before this")
    a = ap.parse_args(argv)
    t0 = time.time()
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    backend, interpret = "gpu", not on_gpu  # off the GPU: the gpu kernels in interpret mode
    if a.smoke:
        contexts, batches, hq, hkv, D, dtype, reps, calls = [512], [1, 2], 8, 2, 64, jnp.float32, 2, 2
    else:
        contexts = [int(x) for x in a.contexts.split(",")]
        batches = [int(x) for x in a.batches.split(",")]
        hq, hkv, D, dtype, reps, calls = 32, 8, 128, jnp.bfloat16, a.reps, a.calls
    result = dict(env=common.environment(), backend=backend, interpret=interpret,
                  shapes=dict(q_heads=hq, kv_heads=hkv, head_dim=D, dtype=jnp.dtype(dtype).name, page_size=PAGE_SIZE,
                              budget=BUDGET, recent=RECENT, calls_per_program=calls, pool="shuffled pages"))
    name = a.name + ("_smoke.json" if a.smoke else ".json")
    splits = [int(x) for x in a.splits.split(",") if x]
    if a.check:
        result["check"] = check(backend, interpret, a.smoke)
        common.write_json(result, a.out, name)
    bw = common.hbm_bandwidth(0.0625 if a.smoke else 2.0)
    result["copy_bytes_per_s"] = bw
    print("copy bandwidth (read + write) GB/s:", bw / 1e9, flush=True)
    rows = []
    for ctx in contexts:
        for B in batches:
            if time.time() - t0 > a.deadline_s:
                print(f"deadline: skipping ctx={ctx} B={B}", flush=True)
                continue
            rows += bench_shape(ctx, B, hq, hkv, D, dtype, backend, interpret, reps, calls, bw, a.sweep, a.profile,
                                a.ragged, splits)
            result["rows"] = rows
            common.write_json(result, a.out, name)
    png = plot(rows, os.path.join(a.out, name.replace(".json", ".png")))
    result["plot"] = png
    result["seconds"] = time.time() - t0
    path = common.write_json(result, a.out, name)
    print(f"wrote {path} {png or '(no plot)'} in {time.time() - t0:.0f} s")
    if "check" in result:
        print("check ok:", all(r["ok"] for r in result["check"]))
    print(table(rows))


if __name__ == "__main__":
    main()

"""The built-in SmolLM2-135M under the sparse methods: accuracy, fidelity, shift and DELTA coverage.

Stages (comma-separated in one process; each writes JSON under --out/<stage>/ as it goes):
  decode    DELTA decoding (issue 9): multi-value needles with 10+ token answers at 4K and 8K; dense,
            the reference schedule, schedule and budget sweeps, the sum variant, calibrated schedules,
            every-layer selection (upper bound), recency-only (floor); per-layer coverage.
  shift     the per-layer shift diagnostic (cosine of attention outputs to dense, per layer, head and
            lag inside a gamma block) for the prefill methods at every length, plus the authors'
            proportions (window + sinks = 3/4 of the prompt).
  fidelity  KL(dense || method) over a recall tail and the NLL of long prose, per method and length.
  tasks     RULER-style task accuracy, per method, task and length.
  sweep     window x sinks x gamma at --sweep-length: shift, KL and (with --sweep-tasks) accuracy.
  probe     compile and run times of one sparse prefill under the Pallas and the XLA kernel paths.

--deadline bounds the whole run: work that would start later is skipped and listed in the JSON, so a
run under a time limit still returns what it finished.

    python benchmarks/real_model_eval.py --stage shift,fidelity --samples 50 --out runs/real --deadline 540
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax import delta as delta_mod  # noqa: E402
from delta_jax.calibrate import best_selection_layers, schedule_coverage  # noqa: E402
from delta_jax.config import DecodeConfig, PrefillConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from delta_jax.eval import fidelity, report, runner, tasks  # noqa: E402
from delta_jax.eval.methods import authors_proportions  # noqa: E402

W, S, G = 256, 16, 64
MAIN = "window,recompute,delta,delta_smooth,delta_shrink,delta_taylor"
SWEEP = ((128, 16, 64), (256, 16, 16), (256, 16, 64), (256, 64, 64), (1024, 16, 64), (1024, 64, 64))
SWEEP_KINDS = "window,recompute,delta,delta_shrink,delta_taylor"


def prefill_methods(window=W, sinks=S, gamma=G) -> dict[str, PrefillConfig]:
    """Every prefill method of the study at one (window, sinks, gamma)."""
    kw = dict(window=window, sinks=sinks, gamma=gamma)

    def delta(**x):
        return PrefillConfig(method="delta", **kw, **x)

    return {
        "window": PrefillConfig(method="window", window=window, sinks=sinks, gamma=None, tail=0),
        "recompute": PrefillConfig(method="window", **kw),
        "delta": delta(),
        "delta_smooth": delta(smooth=True),
        "delta_shrink": delta(variant="shrink"),
        "delta_taylor": delta(variant="taylor"),
        "delta_fitted": delta(variant="fitted"),
        "delta_gated": delta(variant="gated"),
        "delta_nd": delta(variant="nd"),
        "delta_mix": delta(variant="mix"),
        "delta_dense2": delta(dense_layers=2),
        "recompute_dense2": PrefillConfig(method="window", dense_layers=2, **kw),
        "delta_shrink_dense2": delta(variant="shrink", dense_layers=2),
    }


def pick(names: str, window=W, sinks=S, gamma=G) -> dict[str, PrefillConfig]:
    table = prefill_methods(window, sinks, gamma)
    bad = [n for n in names.split(",") if n not in table]
    if bad:
        raise SystemExit(f"unknown methods {bad}; known: {sorted(table)}")
    return {n: table[n] for n in names.split(",")}


def sweep_methods(n: int, kinds: str) -> dict[str, PrefillConfig]:
    """The sweep grid at prompt length `n`: each (window, sinks, gamma) and the 3/4 proportions."""
    out = {}
    for w, s, g in SWEEP + (authors_proportions(n) + (G,),):
        tag = "3/4" if (w, s) == authors_proportions(n) else f"w{w} s{s} g{g}"
        out.update({f"{k} {tag}": v for k, v in pick(kinds, w, s, g).items()})
    return out


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """The run's wall-clock budget: work that would start after `seconds` is skipped and recorded."""

    def __init__(self, seconds):
        self.t0, self.seconds, self.skipped = time.time(), seconds, []

    def expired(self, what: str) -> bool:
        if self.seconds and time.time() - self.t0 > self.seconds:
            self.skipped.append(what)
            return True
        return False


def stage_decode(engine, a, out, clock):
    n = engine.config.num_layers
    ref = DecodeConfig(method="delta")                       # full 0,1; selection 2, 15, 23
    cal_len = int(a.decode_lengths.split(",")[0])
    calib = [s.tokens for s in tasks.make_samples("niah_multivalue_list", engine.tokenizer, length=cal_len,
                                                    n=8, seed=a.seed + 1000)]
    cov_dense = engine.coverage(calib, decode=DecodeConfig(method="dense"), steps=8)
    matrix = cov_dense["matrix"]
    cal3 = best_selection_layers(matrix, full=2, count=3)
    cal5 = best_selection_layers(matrix, full=2, count=5)
    log(f"calibrated selection layers: 3 -> {cal3}, 5 -> {cal5}")
    methods = {
        "dense": DecodeConfig(),
        "delta_ref": ref,
        "delta_sel7": DecodeConfig(method="delta", selection_layers=tuple(range(2, n - 3, 4))),
        "delta_full4": DecodeConfig(method="delta", full_layers=(0, 1, 2, 3),
                                    selection_layers=tuple(x * n // 28 for x in (4, 12, 20))),
        "delta_ref_b128": dataclasses.replace(ref, budget=128),
        "delta_sum": dataclasses.replace(ref, variant="sum"),
        "delta_cal3": DecodeConfig(method="delta", selection_layers=cal3),
        "delta_cal5": DecodeConfig(method="delta", selection_layers=cal5),
        "per_layer": dataclasses.replace(ref, variant="per_layer"),
        "recent_only": dataclasses.replace(ref, budget=8, recent=8),
    }
    coverage = {"calibration": {"length": cal_len, "prompts": len(calib), "matrix": matrix.tolist(),
                                "cal3": cal3, "cal5": cal5,
                                "predicted": {k: schedule_coverage(matrix, 2, v) for k, v in
                                              (("ref", (2, 15, 23)), ("cal3", cal3), ("cal5", cal5))}}}
    evalp = [s.tokens for s in tasks.make_samples("niah_multivalue_list", engine.tokenizer, length=cal_len,
                                                  n=8, seed=a.seed)]
    for name in () if a.skip_coverage else ("delta_ref", "delta_cal5"):
        c = engine.coverage(evalp, decode=methods[name], steps=8)
        coverage[name] = {"roles": c["roles"], "covered": c["covered"].tolist(), "oracle": c["oracle"].tolist()}
        log(f"coverage {name}: mean covered {np.mean(c['covered']):.3f} oracle {np.mean(c['oracle']):.3f}")
    report.write_json(coverage, os.path.join(out, "coverage.json"))
    pairs = {k: (PrefillConfig(), v) for k, v in methods.items()}
    res = runner.run_eval(engine, tasks=a.decode_tasks.split(","), lengths=[int(x) for x in a.decode_lengths.split(",")],
                          methods=pairs, samples=a.samples, seed=a.seed, out_dir=out, progress=False,
                          batch_size=a.batch_size)
    print(res["table"], flush=True)


def shift_rows(cfg: PrefillConfig, n: int) -> tuple[int, int]:
    """Rows compared: those whose window misses context (t >= window + sinks) and that precede the
    default exact tail of the method's (window, sinks, gamma), the same rows for every method there."""
    tail = PrefillConfig(method="delta", window=cfg.window, sinks=cfg.sinks, gamma=cfg.gamma or G).tail_rows(n)
    start = cfg.window + cfg.sinks
    return start, max(start + 1, n - tail)


def shift_record(engine, texts: list, cfg: PrefillConfig) -> dict:
    """Per layer, head and lag (t mod gamma) the mean cosine to dense over the compared rows."""
    n = len(texts[0])
    start, stop = shift_rows(cfg, n)
    cos = np.stack([engine.shift_cosines(t, prefill=cfg)[:, start:stop] for t in texts])  # [n, L, R, H]
    per_sample = cos.mean(axis=(2, 3))                                                    # [n, L]
    k = len(texts)
    half = 1.96 * per_sample.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.zeros(cos.shape[1])
    overall = per_sample.mean(1)
    rows = cos.mean(axis=(0, 3))                                                          # [L, R]
    g = cfg.gamma or G
    lag = np.arange(start, stop) % g
    return {"prefill": dataclasses.asdict(cfg), "rows": [start, stop], "samples": k,
            "mean": per_sample.mean(0).tolist(), "ci95": half.tolist(),
            "per_head": cos.mean(axis=(0, 2)).tolist(),
            "p05": np.quantile(np.moveaxis(cos, 1, 0).reshape(cos.shape[1], -1), 0.05, axis=1).tolist(),
            "by_lag": [[float(rows[li, lag == d].mean()) if (lag == d).any() else None for d in range(g)]
                       for li in range(rows.shape[0])],
            "overall": float(overall.mean()),
            "overall_ci95": float(1.96 * overall.std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0}


def run_shift(engine, jobs, texts_for, clock, result, path):
    """`jobs`: (length, name, config) in priority order; fills `result["lengths"]` and writes `path`."""
    for n, name, cfg in jobs:
        if clock.expired(f"shift {n} {name}"):
            continue
        t0 = time.time()
        rec = shift_record(engine, texts_for(n), cfg)
        result["lengths"].setdefault(str(n), {})[name] = rec
        log(f"shift {n} {name}: {rec['overall']:.4f} ± {rec['overall_ci95']:.4f} ({time.time() - t0:.0f}s)")
        report.write_json(result, path)


def plot_shift(per: dict, names, path, title):
    report.plot_layers({k: np.asarray(per[k]["mean"]) for k in names if k in per}, path,
                       ylabel="mean cosine to dense", title=title)


def run_kl_ppl(engine, jobs, recall_for, prose_for, clock, result, path, batch_size):
    """KL over the recall tail and prose NLL per (length, name, config) job: one scoring pass per method
    over both prompt sets, against dense scores made once per length."""
    refs = {}
    for n, name, cfg in jobs:
        if clock.expired(f"fidelity {n} {name}"):
            continue
        t0 = time.time()
        recall, prose = recall_for(n), prose_for(n)
        if n not in refs:
            rr, rp = fidelity.score_sets(engine, PrefillConfig(), recall, prose, batch_size=batch_size)
            refs[n] = rr, fidelity.nll_stats(rp, prose)
            result["lengths"][str(n)] = {"kl": {}, "nll": {"dense": fidelity.nll_summary(
                PrefillConfig(), refs[n][1], refs[n][1])}, "dense_value_top1": fidelity.mean_value_top1(rr, recall)}
        ref_recall, dense_nll = refs[n]
        res_recall, res_prose = fidelity.score_sets(engine, cfg, recall, prose, batch_size=batch_size)
        per = result["lengths"][str(n)]
        per["kl"][name] = fidelity.kl_summary(cfg, fidelity.kl_stats(ref_recall, res_recall, recall))
        per["nll"][name] = fidelity.nll_summary(cfg, fidelity.nll_stats(res_prose, prose), dense_nll)
        m, nll = per["kl"][name]["kl"], per["nll"][name]["nll"]["mean"]
        log(f"fidelity {n} {name}: KL {m['mean']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
            f"NLL {nll:.3f} (dense {per['nll']['dense']['nll']['mean']:.3f}) ({time.time() - t0:.0f}s)")
        report.write_json(result, path)


def run_tasks(engine, a, jobs, methods_for, clock, out_dir):
    """Task accuracy for (length, task) jobs, every method of `methods_for(length)` on the same samples."""
    rows, meta = [], {}
    for n, task in jobs:
        if clock.expired(f"tasks {n} {task}"):
            continue
        t0 = time.time()
        res = runner.run_eval(engine, tasks=[task], lengths=[n], methods=methods_for(n), samples=a.samples,
                              seed=a.seed, progress=False, batch_size=a.batch_size)
        rows += res["results"]
        meta = res["meta"]
        merged = {"meta": {**meta, "samples": a.samples, "skipped": clock.skipped}, "results": rows,
                  "table": report.markdown_table(rows)}
        merged["by_depth"] = runner.depth_breakdown(merged)
        runner.write_outputs(merged, out_dir)
        log(f"tasks {n} {task} ({time.time() - t0:.0f}s)\n{report.markdown_table(res['results'])}")


class Texts:
    """Prompts made once per length and reused by every method."""

    def __init__(self, make):
        self.make, self.cache = make, {}

    def __call__(self, n):
        if n not in self.cache:
            self.cache[n] = self.make(n)
        return self.cache[n]


def _ordered(lengths, names, extra_names=()):
    """Jobs in priority order: every main method at every length, then the extras."""
    return [(n, name) for group in (names, extra_names) for name in group for n in lengths]


def stage_shift(engine, a, out, clock):
    lengths = [int(x) for x in a.lengths.split(",")]
    main = list(a.methods.split(","))
    extra = [x for x in a.extra.split(",") if x] if a.extra else []
    texts = Texts(lambda n: fidelity.prose_tokens(engine.tokenizer, length=n, n=a.shift_samples, seed=a.seed))
    jobs = [(n, name, pick(name)[name]) for n, name in _ordered(lengths, main)]
    for n in lengths:
        w34, s34 = authors_proportions(n)
        jobs += [(n, f"{k} 3/4", v) for k, v in pick("recompute,delta,delta_shrink,delta_taylor", w34, s34, G).items()]
    jobs += [(n, name, pick(name)[name]) for n, name in _ordered(lengths, extra)]
    result = {"env": common.environment(), "window": W, "sinks": S, "gamma": G, "lengths": {},
              "skipped": clock.skipped}
    path = os.path.join(out, "shift.json")
    run_shift(engine, jobs, texts, clock, result, path)
    for n, per in result["lengths"].items():
        plot_shift(per, main + extra, os.path.join(out, f"shift_{n}.png"),
                   f"SmolLM2-135M, {n} tokens, window {W}, sinks {S}, gamma {G}")


def stage_fidelity(engine, a, out, clock):
    lengths = [int(x) for x in a.lengths.split(",")]
    main = list(a.methods.split(","))
    extra = [x for x in a.extra.split(",") if x] if a.extra else []
    recall = Texts(lambda n: fidelity.recall_samples(engine.tokenizer, length=n, n=a.samples, seed=a.seed))
    prose = Texts(lambda n: fidelity.prose_tokens(engine.tokenizer, length=n, n=a.samples, seed=a.seed))
    jobs = [(n, name, pick(name)[name]) for n, name in _ordered(lengths, main, extra)]
    result = {"env": common.environment(), "window": W, "sinks": S, "gamma": G, "lengths": {},
              "skipped": clock.skipped}
    run_kl_ppl(engine, jobs, recall, prose, clock, result, os.path.join(out, "fidelity.json"), a.batch_size)


def stage_tasks(engine, a, out, clock):
    lengths = [int(x) for x in a.lengths.split(",")]
    names = ["dense"] + a.methods.split(",") + ([x for x in a.extra.split(",") if x] if a.extra else [])
    table = {"dense": PrefillConfig(), **pick(",".join(names[1:]))}
    jobs = [(n, t) for t in a.tasks.split(",") for n in lengths]
    run_tasks(engine, a, jobs, lambda n: table, clock, out)


def stage_sweep(engine, a, out, clock):
    n = a.sweep_length
    cfgs = sweep_methods(n, a.sweep_kinds)
    result = {"env": common.environment(), "length": n, "lengths": {}, "skipped": clock.skipped}
    texts = Texts(lambda n: fidelity.prose_tokens(engine.tokenizer, length=n, n=a.shift_samples, seed=a.seed))
    run_shift(engine, [(n, k, v) for k, v in cfgs.items()], texts, clock, result, os.path.join(out, "shift.json"))
    fid = {"env": result["env"], "lengths": {}, "skipped": clock.skipped}
    recall = Texts(lambda n: fidelity.recall_samples(engine.tokenizer, length=n, n=a.samples, seed=a.seed))
    prose = Texts(lambda n: fidelity.prose_tokens(engine.tokenizer, length=n, n=a.samples, seed=a.seed))
    run_kl_ppl(engine, [(n, k, v) for k, v in cfgs.items()], recall, prose, clock, fid,
               os.path.join(out, "fidelity.json"), a.batch_size)
    if a.sweep_tasks:
        run_tasks(engine, a, [(n, t) for t in a.sweep_tasks.split(",")],
                  lambda n: {"dense": PrefillConfig(), **cfgs}, clock, os.path.join(out, "tasks"))


def stage_probe(engine, a, out, clock):
    """Compile and run seconds of the shift pass at the longest length under both kernel paths."""
    n = max(int(x) for x in a.lengths.split(","))
    toks = fidelity.prose_tokens(engine.tokenizer, length=n, n=1, seed=a.seed)[0]
    res = {"env": common.environment(), "length": n}
    import jax
    for backend in ("gpu", "xla") if jax.default_backend() == "gpu" else ("xla",):
        cfg = pick("delta_shrink")["delta_shrink"]
        with delta_mod.kernel_backend(backend):
            t0 = time.time()
            engine.shift_cosines(toks, prefill=cfg)
            first = time.time() - t0
            t0 = time.time()
            engine.shift_cosines(toks, prefill=cfg)
        res[backend] = {"first_call_s": first, "run_s": time.time() - t0}
        log(f"probe {backend}: first call {first:.1f}s, then {res[backend]['run_s']:.3f}s")
    report.write_json(res, os.path.join(out, "probe.json"))


STAGES = {"decode": stage_decode, "shift": stage_shift, "fidelity": stage_fidelity, "tasks": stage_tasks,
          "sweep": stage_sweep, "probe": stage_probe}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, help=f"comma-separated, from {sorted(STAGES)}")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernel-backend", default=None, choices=["gpu", "tpu", "xla"],
                    help="kernel path of the sparse methods (default: Pallas on GPU/TPU)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--shift-samples", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="2000,4000,8000")
    ap.add_argument("--methods", default=MAIN, help=f"prefill methods, from {sorted(prefill_methods())}")
    ap.add_argument("--extra", default="", help="further methods, run after the main ones at every length")
    ap.add_argument("--tasks", default="niah_multivalue,niah_multikey_1,niah_multiquery,variable_tracking,"
                                        "niah_single,niah_multikey_2")
    ap.add_argument("--sweep-length", type=int, default=4000)
    ap.add_argument("--sweep-kinds", default=SWEEP_KINDS)
    ap.add_argument("--sweep-tasks", default="")
    ap.add_argument("--decode-lengths", default="4000,8000")
    ap.add_argument("--decode-tasks", default="niah_multivalue_list,niah_multivalue")
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new work starts")
    ap.add_argument("--out", default="runs/real")
    a = ap.parse_args(argv)
    stages = a.stage.split(",")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {sorted(STAGES)}")
    for names in (a.methods, a.extra, a.sweep_kinds):
        if names:
            pick(names)
    run_stages(STAGES, stages, a)


def run_stages(table: dict, stages: list, a) -> None:
    """Loads the real model once and runs `table[stage](engine, a, out, clock)` for each stage under the
    deadline, each writing under `a.out/<stage>/` beside its env.json."""
    delta_mod.KERNEL_BACKEND = a.kernel_backend
    clock = Clock(a.deadline)
    engine = Engine.from_pretrained(a.model, dtype=a.dtype, progress=False)
    for stage in stages:
        out = os.path.join(a.out, stage)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "env.json"), "w") as f:
            json.dump({**common.environment(), "args": vars(a)}, f, indent=2)
        t0 = time.time()
        table[stage](engine, a, out, clock)
        log(f"stage {stage} done in {time.time() - t0:.0f}s")
    if clock.skipped:
        log(f"deadline: skipped {len(clock.skipped)} jobs: {clock.skipped}")


if __name__ == "__main__":
    main()

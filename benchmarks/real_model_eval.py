"""The built-in SmolLM2-135M under the sparse methods: accuracy, fidelity, shift and DELTA coverage.

Stages (each writes JSON under --out/<stage>/):
  decode   DELTA decoding (issue 9): multi-value needles with 10+ token answers at 4K and 8K; dense,
           the reference schedule, schedule and budget sweeps, the sum variant, calibrated schedules,
           every-layer selection (upper bound), recency-only (floor); per-layer coverage.
  prefill  Delta Attention prefill (issue 8): RULER-style tasks and fidelity (KL over a recall tail,
           perplexity) for dense, window (sparse-only), recompute, delta and its variants.
  shift    the per-layer shift diagnostic (cosine to dense) for the same methods and a sweep over
           window, sinks, gamma and the authors' proportions, with KL for the sweep.

    python benchmarks/real_model_eval.py --stage decode --samples 50 --out runs/real
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
from delta_jax.calibrate import best_selection_layers, schedule_coverage  # noqa: E402
from delta_jax.config import DecodeConfig, PrefillConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from delta_jax.eval import fidelity, report, runner, tasks  # noqa: E402
from delta_jax.eval.methods import authors_proportions  # noqa: E402

W, S, G = 256, 16, 64


def prefill_methods(window=W, sinks=S, gamma=G, variants=("shrink",)) -> dict:
    out = {
        "window": PrefillConfig(method="window", window=window, sinks=sinks, gamma=None, tail=0),
        "recompute": PrefillConfig(method="window", window=window, sinks=sinks, gamma=gamma),
        "delta": PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma),
    }
    for v in variants:
        out[f"delta_{v}"] = PrefillConfig(method="delta", window=window, sinks=sinks, gamma=gamma, variant=v)
    return out


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_decode(engine, a, out):
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


def stage_prefill(engine, a, out):
    methods = {"dense": PrefillConfig(), **prefill_methods()}
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.prefill_tasks:
        res = runner.run_eval(engine, tasks=a.prefill_tasks.split(","), lengths=lengths, methods=methods,
                              samples=a.samples, seed=a.seed, out_dir=os.path.join(out, "tasks"), progress=False,
                              batch_size=a.batch_size)
        print(res["table"], flush=True)
    fl = [int(x) for x in (a.fidelity_lengths or a.lengths).split(",")]
    fid = fidelity.run_fidelity(engine, methods=methods, lengths=fl, samples=a.samples, seed=a.seed,
                                batch_size=a.batch_size, out_dir=os.path.join(out, "fidelity"), progress=False)
    for r in fid["kl"]:
        for name, m in r["methods"].items():
            log(f"KL {r['length']} {name}: {m['kl']['mean']:.4f} [{m['kl']['ci_low']:.4f}, {m['kl']['ci_high']:.4f}]")


def _shift_summary(cos: list, start: int, stop: int) -> dict:
    body = np.concatenate([c[:, start:stop] for c in cos], axis=1)       # [L, rows, H]
    per_sample = np.stack([c[:, start:stop].mean(axis=(1, 2)) for c in cos])  # [n, L]
    half = 1.96 * per_sample.std(0, ddof=1) / np.sqrt(len(cos)) if len(cos) > 1 else np.zeros(body.shape[0])
    return {"mean": body.mean(axis=(1, 2)).tolist(), "ci95": half.tolist(), "per_head": body.mean(axis=1).tolist(),
            "p05": np.quantile(body.reshape(body.shape[0], -1), 0.05, axis=1).tolist(),
            "overall": float(body.mean())}


def stage_shift(engine, a, out):
    lengths = [int(x) for x in a.lengths.split(",")]
    main = prefill_methods(variants=("shrink", "fitted", "gated", "nd", "mix"))
    sweep = {}
    for w, s, g in ((128, 16, 64), (256, 16, 16), (256, 64, 64), (1024, 16, 64), (1024, 64, 64)):
        for kind in ("recompute", "delta", "delta_shrink"):
            sweep[f"{kind} w{w} s{s} g{g}"] = prefill_methods(w, s, g, variants=("shrink",))[kind]
    result = {"env": common.environment(), "lengths": {}}
    for n in lengths:
        texts = fidelity.prose_tokens(engine.tokenizer, length=n, n=a.shift_samples, seed=a.seed)
        w34, s34 = authors_proportions(n)
        cfgs = dict(main)
        if n == a.sweep_length:
            cfgs.update(sweep)
        for kind in ("recompute", "delta", "delta_shrink"):
            cfgs[f"{kind} 3/4"] = prefill_methods(w34, s34, G, variants=("shrink",))[kind]
        per = {}
        for name, cfg in cfgs.items():
            t0 = time.time()
            cos = [engine.shift_cosines(t, prefill=cfg) for t in texts]
            tail = cfg.tail_rows(n) if cfg.method != "dense" else 0
            start, stop = cfg.window + cfg.sinks, n - max(tail, cfg.gamma - 1 + max(128, cfg.gamma) if cfg.gamma else 0)
            stop = max(stop, start + 1)
            per[name] = {"prefill": dataclasses.asdict(cfg), "rows": [start, stop], **_shift_summary(cos, start, stop)}
            log(f"shift {n} {name}: {per[name]['overall']:.4f} ({time.time() - t0:.0f}s)")
        result["lengths"][str(n)] = per
        report.plot_layers({k: np.asarray(v["mean"]) for k, v in per.items() if k in main},
                           os.path.join(out, f"shift_{n}.png"), ylabel="mean cosine to dense",
                           title=f"SmolLM2-135M, {n} tokens, window {W}, sinks {S}, gamma {G}")
        report.write_json(result, os.path.join(out, "shift.json"))
    if a.sweep_length not in lengths:
        return
    kl_methods = {"dense": PrefillConfig(), **{k: v for k, v in sweep.items()}}
    fid = fidelity.run_fidelity(engine, methods=kl_methods, lengths=[a.sweep_length], samples=a.samples,
                                seed=a.seed, batch_size=a.batch_size, out_dir=os.path.join(out, "sweep_fidelity"),
                                progress=False)
    for r in fid["kl"]:
        for name, m in r["methods"].items():
            log(f"sweep KL {r['length']} {name}: {m['kl']['mean']:.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=["decode", "prefill", "shift"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--shift-samples", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="2000,4000,8000")
    ap.add_argument("--sweep-length", type=int, default=4000)
    ap.add_argument("--decode-lengths", default="4000,8000")
    ap.add_argument("--decode-tasks", default="niah_multivalue_list,niah_multivalue")
    ap.add_argument("--prefill-tasks", default="niah_single,niah_multikey_2,niah_multikey_3,niah_multivalue,"
                                               "variable_tracking")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--fidelity-lengths", default=None, help="lengths for KL/perplexity (default --lengths)")
    a = ap.parse_args(argv)
    engine = Engine.from_pretrained(a.model, dtype=a.dtype)
    out = os.path.join(a.out, a.stage)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump({**common.environment(), "args": vars(a)}, f, indent=2)
    t0 = time.time()
    {"decode": stage_decode, "prefill": stage_prefill, "shift": stage_shift}[a.stage](engine, a, out)
    log(f"stage {a.stage} done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

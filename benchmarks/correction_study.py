"""Which prefill correction, on which text; and Delta prefill with DELTA decode together (issue 15).

Stages (comma-separated, one process; each writes JSON under --out/<stage>/ as it goes):
  families  on the text families of `delta_jax.eval.families`, per family and length: KL(dense || method)
            over the exact recall tail and the NLL of the body, for recompute, `shrink`, `taylor` and the
            published delta (window 256, sinks 16, gamma 64; the last --exact rows exact for every method,
            covering the recall tail), 95% t intervals over samples, and paired differences per family
            and length (taylor - shrink first). One dense pass per sample serves every method.
  backends  the kernel `taylor` against the XLA `taylor` (same samples, one dense pass): per family and
            length, KL(XLA || kernel) over the recall tail, the paired kernel - XLA differences of KL(dense ||
            taylor) and body NLL, and each layer's mean cosine to dense attention (the shift) under both paths.
  pipeline  what users run, through `Engine.generate`: dense prefill + dense decode; published delta
            prefill + DELTA decode on the reference layers; `taylor` prefill + DELTA decode on the
            calibrated layers 2, 3, 6, 7, 15; on the decode study's tasks (three listed values, four
            values; 24-40 token answers); accuracy with 95% intervals.
--deadline (seconds) stops starting new work, so a 10-minute device call returns what it finished;
the JSON lists what was skipped. --report rebuilds the tables (markdown for the README) and plots from
the JSON of one or several runs (runs of the same seed and sample count merge; the first run of a
cell wins).

    python benchmarks/correction_study.py --stage families,pipeline --out runs/study --deadline 500
    python benchmarks/correction_study.py --smoke --out /tmp/study          # CPU check of both stages
    python benchmarks/correction_study.py --report runs/a/families/families.json \
        runs/b/pipeline/results.json --out runs/study
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
from benchmarks.real_model_eval import G, S, W, log, pick, run_stages, run_tasks  # noqa: E402
from delta_jax import delta as delta_mod  # noqa: E402
from delta_jax.config import DecodeConfig, PrefillConfig  # noqa: E402
from delta_jax.eval import fidelity, report, runner  # noqa: E402
from delta_jax.eval.families import FAMILIES, family_samples  # noqa: E402
from delta_jax.eval.stats import paired_difference  # noqa: E402
from pallas_kernels import pick_backend  # noqa: E402

EXACT = 160
CORRECTIONS = "delta_shrink,delta_taylor,recompute,delta"
PAIRS = (("delta_taylor", "delta_shrink"), ("delta_shrink", "recompute"), ("delta_taylor", "recompute"),
         ("delta", "recompute"))
LABELS = {"recompute": "recompute", "delta": "delta (published)", "delta_shrink": "`shrink`",
          "delta_taylor": "`taylor`"}
CALIBRATED = (2, 3, 6, 7, 15)


def _pipeline() -> dict[str, tuple[str, PrefillConfig, DecodeConfig]]:
    """Pipelines by name: (label, prefill, decode)."""
    def delta(variant="published"):
        return PrefillConfig(method="delta", window=W, sinks=S, gamma=G, variant=variant)

    calibrated = DecodeConfig(method="delta", selection_layers=CALIBRATED)
    return {
        "dense": ("dense prefill + dense decode", PrefillConfig(), DecodeConfig()),
        "published": ("delta prefill + DELTA decode, reference layers", delta(), DecodeConfig(method="delta")),
        "taylor_cal": ("`taylor` prefill + DELTA decode, calibrated layers", delta("taylor"), calibrated),
        "shrink_cal": ("`shrink` prefill + DELTA decode, calibrated layers", delta("shrink"), calibrated),
        "taylor_dense": ("`taylor` prefill + dense decode", delta("taylor"), DecodeConfig()),
        "dense_cal": ("dense prefill + DELTA decode, calibrated layers", PrefillConfig(), calibrated),
    }


PIPELINE = _pipeline()
TASK_NAMES = {"niah_multivalue_list": "list", "niah_multivalue": "multi-value"}


# ---------------------------------------------------------------------------- families stage

def stage_families(engine, a, out, clock):
    methods = pick(a.methods)  # family_fidelity makes the last --exact rows exact
    path = os.path.join(out, "families.json")
    result = {"env": common.environment(),
              "config": {"window": W, "sinks": S, "gamma": G, "exact": a.exact, "start_fraction": a.start_fraction,
                         "samples": a.samples, "seed": a.seed, "dtype": str(np.dtype(engine.dtype)),
                         "methods": {k: dataclasses.asdict(v) for k, v in methods.items()}},
              "cells": {}, "skipped": clock.skipped}

    def done(cell):
        result["cells"].setdefault(str(cell["length"]), {})[cell["family"]] = cell
        name, m = list(cell["methods"].items())[-1]
        log(f"families {cell['length']} {cell['family']} {name}: KL {m['kl']['mean']:.4f} [{m['kl']['ci_low']:.4f}, "
            f"{m['kl']['ci_high']:.4f}] NLL {m['nll']['mean']:.3f} (dense {cell['dense']['nll']['mean']:.3f}) "
            f"({m['seconds']:.0f}s)")
        report.write_json(result, path)

    for n in [int(x) for x in a.lengths.split(",")]:
        for fam in a.families.split(","):
            if clock.expired(f"families {n} {fam}"):
                continue
            t0 = time.time()
            cell = fidelity.family_fidelity(
                engine, methods, family=fam, length=n, samples=a.samples, seed=a.seed, exact=a.exact,
                start_fraction=a.start_fraction, batch_size=a.batch_size, pairs=PAIRS, done=done,
                skip=lambda name: clock.expired(f"families {n} {fam} {name}"))
            cell["seconds"] = time.time() - t0
            report.write_json(result, path)
    if result["cells"]:
        write_families(result, out)


# ---------------------------------------------------------------------------- backends stage

def stage_backends(engine, a, out, clock):
    """The kernel path (`--kernel-backend`, default the platform's Pallas kernels) against the XLA path, both
    running `taylor` with the last --exact rows exact, on the same samples as the families stage."""
    kernel = pick_backend(a.kernel_backend)
    if kernel == "xla" and not a.smoke:
        raise SystemExit("the backends stage compares the Pallas kernels with XLA: run it on a GPU or TPU")
    pre = dataclasses.replace(pick("delta_taylor")["delta_taylor"], tail=a.exact)
    paths = sorted({kernel, "xla"})  # one path in the CPU smoke, which checks the code only
    path = os.path.join(out, "backends.json")
    result = {"env": common.environment(), "kernel": kernel, "prefill": dataclasses.asdict(pre),
              "config": {"exact": a.exact, "start_fraction": a.start_fraction, "samples": a.samples,
                         "seed": a.seed, "dtype": str(np.dtype(engine.dtype))},
              "cells": {}, "shift": {}, "skipped": clock.skipped}
    for n in [int(x) for x in a.lengths.split(",")]:
        for fam in a.families.split(","):
            if clock.expired(f"backends {n} {fam}"):
                continue
            texts = family_samples(fam, engine.tokenizer, length=n, n=a.samples, seed=a.seed,
                                   tail_tokens=a.exact - 1)
            seqs = [s.tokens for s in texts]
            ref = fidelity.score_all(engine, seqs, PrefillConfig(), last=a.exact, batch_size=a.batch_size)
            res, kl, nll = {}, {}, {}
            for name in paths:
                with delta_mod.kernel_backend(name):
                    res[name] = fidelity.score_all(engine, seqs, pre, last=a.exact, batch_size=a.batch_size)
                kl[name] = fidelity.kl_stats(ref, res[name], texts)["kl"]
                nll[name] = fidelity.body_nll(res[name], texts, exact=a.exact, start_fraction=a.start_fraction)
            between = fidelity.kl_stats(res["xla"], res[kernel], texts)
            cell = {"samples": len(seqs), "kl_xla_kernel": fidelity.mean_ci(between["kl"]),
                    "kl_xla_kernel_max": float(np.max(between["kl"])),
                    "top1_agree": float(np.mean(between["top1_agree"])),
                    "kl": {k: fidelity.mean_ci(v) for k, v in kl.items()},
                    "nll": {k: fidelity.mean_ci(v) for k, v in nll.items()},
                    "kl_diff": paired_difference(kl[kernel], kl["xla"]),
                    "nll_diff": paired_difference(nll[kernel], nll["xla"])}
            result["cells"].setdefault(str(n), {})[fam] = cell
            log(f"backends {n} {fam}: KL(xla || {kernel}) {cell['kl_xla_kernel']['mean']:.2e} (max "
                f"{cell['kl_xla_kernel_max']:.2e}), KL to dense {kernel} - xla {cell['kl_diff']['mean']:+.2e} "
                f"[{cell['kl_diff']['ci_low']:+.2e}, {cell['kl_diff']['ci_high']:+.2e}], NLL {kernel} - xla "
                f"{cell['nll_diff']['mean']:+.2e}")
            report.write_json(result, path)
        if clock.expired(f"backends {n} shift"):
            continue
        prose = fidelity.prose_tokens(engine.tokenizer, length=n, n=a.shift_samples, seed=a.seed)
        cos = {}
        for name in paths:
            with delta_mod.kernel_backend(name):
                cos[name] = np.mean([engine.shift_cosines(t, prefill=pre).mean(axis=(1, 2)) for t in prose], axis=0)
        result["shift"][str(n)] = {"samples": len(prose), "per_layer": {k: v.tolist() for k, v in cos.items()},
                                   "max_abs_diff": float(np.max(np.abs(cos[kernel] - cos["xla"])))}
        log(f"backends {n} shift: mean cosine {kernel} {cos[kernel].mean():.5f}, xla {cos['xla'].mean():.5f}, "
            f"largest per-layer difference {result['shift'][str(n)]['max_abs_diff']:.2e}")
        report.write_json(result, path)


# ---------------------------------------------------------------------------- pipeline stage

def stage_pipeline(engine, a, out, clock):
    names = a.pipeline.split(",")
    methods = {k: PIPELINE[k][1:] for k in names}
    jobs = [(int(n), t) for n in a.lengths.split(",") for t in a.tasks.split(",")]
    run_tasks(engine, a, jobs, lambda n: methods, clock, out)
    path = os.path.join(out, "results.json")
    if os.path.exists(path):  # results.md and accuracy.png are run_tasks'; this adds the README table
        with open(path) as f, open(os.path.join(out, "pipeline.md"), "w") as md:
            md.write(pipeline_table(json.load(f)["results"]))


# ---------------------------------------------------------------------------- tables and plots

def _ci(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} ± {(x['ci_high'] - x['ci_low']) / 2:.{digits}f}"


def _diff(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:+.{digits}f} [{x['ci_low']:+.{digits}f}, {x['ci_high']:+.{digits}f}]"


def _order(names) -> list[str]:
    """Methods in the tables' order: recompute, published delta, shrink, taylor, then the rest."""
    return sorted(names, key=lambda m: list(LABELS).index(m) if m in LABELS else len(LABELS))


def pooled(per: dict, x: str, y: str, key: str) -> dict | None:
    """Paired difference over the samples of every family at one length that has both methods."""
    a, b = [], []
    for cell in per.values():
        if x in cell["methods"] and y in cell["methods"]:
            a += cell["methods"][x][f"per_sample_{key}"]
            b += cell["methods"][y][f"per_sample_{key}"]
    return paired_difference(a, b) if a else None


def families_tables(res: dict) -> str:
    """Markdown: per length, KL over the recall tail (with dense's teacher-forced top-1 accuracy on the
    recalled value tokens: how much of the recall the model can do at all) and body NLL per family and
    method (± 95% t half-width), and the paired taylor - shrink difference [95% t interval]."""
    names = _order(res["config"]["methods"])
    x, y = PAIRS[0]
    out = []
    for n in sorted(res["cells"], key=int):
        per = res["cells"][n]
        fams = [f for f in FAMILIES if f in per]
        for key, title in (("kl", "KL(dense ‖ method) over the recall tail"), ("nll", "body NLL")):
            dense = ["dense"] if key == "nll" else ["dense top-1 on values"]
            head = ["family", "samples"] + dense + [LABELS.get(m, m) for m in names] + ["taylor − shrink [95%]"]
            lines = [f"**{title}, {n} tokens**", "", "| " + " | ".join(head) + " |",
                     "|---|" + "---:|" * (len(head) - 1)]
            for f in fams:
                cell = per[f]
                cells = [f, str(cell["samples"]), _ci(cell["dense"]["nll"]) if key == "nll" else
                         f"{100 * cell['dense']['value_top1']:.0f}%"]
                cells += [_ci(cell["methods"][m][key], 4 if key == "kl" else 3) if m in cell["methods"] else ""
                          for m in names]
                d = cell["paired"].get(f"{x} - {y}")
                cells.append(_diff(d[key], 4 if key == "kl" else 3) if d else "")
                lines.append("| " + " | ".join(cells) + " |")
            d = pooled(per, x, y, key)
            if d and len(fams) > 1:
                lines.append("| all families (pooled) | " + str(d["n"]) + " |" + " |" * (len(dense) + len(names))
                             + f" {_diff(d, 4 if key == 'kl' else 3)} |")
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def families_plot(res: dict, path: str) -> str:
    """Per length (columns): KL over the recall tail and body NLL minus dense per family (groups) and
    method (bars), each followed by the paired difference taylor - shrink per family and pooled; 95%
    t intervals."""
    plt = report._pyplot()
    names = _order(res["config"]["methods"])
    lengths = sorted(res["cells"], key=int)
    fig, axes = plt.subplots(4, len(lengths), figsize=(6 * len(lengths), 13), squeeze=False)
    width = 0.8 / max(1, len(names))
    x, y = PAIRS[0]
    pair = f"{LABELS.get(x, x).strip('`')} - {LABELS.get(y, y).strip('`')}"
    for j, n in enumerate(lengths):
        per = res["cells"][n]
        fams = [f for f in FAMILIES if f in per]
        for i, (key, diff, ylabel, short) in enumerate((("kl", "kl", "KL(dense || method), recall tail", "KL"),
                                                        ("nll_minus_dense", "nll", "body NLL - dense", "body NLL"))):
            ax = axes[2 * i, j]
            for k, m in enumerate(names):
                recs = [per[f]["methods"].get(m) for f in fams]
                xs = [q + (k - (len(names) - 1) / 2) * width for q, r in enumerate(recs) if r]
                ys = np.array([[r[key]["mean"], r[key]["ci_low"], r[key]["ci_high"]] for r in recs if r])
                if len(ys):
                    ax.bar(xs, ys[:, 0], width, yerr=[ys[:, 0] - ys[:, 1], ys[:, 2] - ys[:, 0]], capsize=2,
                           label=LABELS.get(m, m).strip("`"))
            ax.set_xticks(range(len(fams)), fams)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{n} tokens")
            ax.grid(alpha=0.3, axis="y")
            ax = axes[2 * i + 1, j]
            pts = [(q, d) for q, d in enumerate([per[f]["paired"].get(f"{x} - {y}", {}).get(diff) for f in fams]
                                                + [pooled(per, x, y, diff)]) if d]
            if pts:
                ax.errorbar([q for q, _ in pts], [d["mean"] for _, d in pts], fmt="o", capsize=3,
                            yerr=[[d["mean"] - d["ci_low"] for _, d in pts], [d["ci_high"] - d["mean"] for _, d in pts]])
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(fams) + 1), fams + ["pooled"])
            ax.set_ylabel(f"{short}: {pair} (paired)")
            ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"window {res['config']['window']}, sinks {res['config']['sinks']}, gamma {res['config']['gamma']}, "
                 f"{res['config']['samples']} samples per bar, 95% t intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pipeline_table(rows: list[dict]) -> str:
    """Markdown: accuracy (% ± 95% half-width) per pipeline, task and length, and the mean over tasks."""
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["method"], r["task"], r["length"]): r for r in rows}
    head = ["pipeline"] + [f"{TASK_NAMES.get(t, t)} {n}" for t in tasks for n in lengths] + \
        [f"mean {n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [PIPELINE[m][0] if m in PIPELINE else m]
        for t in tasks:
            for n in lengths:
                r = cell.get((m, t, n))
                cells.append("" if r is None else f"{100 * r['accuracy']:.1f} ± {50 * (r['ci_high'] - r['ci_low']):.1f}")
        for n in lengths:
            accs = [cell[m, t, n]["accuracy"] for t in tasks if (m, t, n) in cell]
            cells.append(f"{100 * np.mean(accs):.1f}" if len(accs) == len(tasks) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_families(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "families.md"), "w") as f:
        f.write(families_tables(res))
    families_plot(res, os.path.join(out, "families.png"))


def merge_families(runs: list[dict]) -> dict:
    """One families result from several runs of the same seed and sample count (first run of a cell wins)."""
    key = ("seed", "samples", "exact", "window", "sinks", "gamma", "start_fraction", "dtype")
    first = runs[0]["config"]
    out = {"env": [r["env"] for r in runs], "config": {**first, "methods": {}}, "cells": {},
           "skipped": [s for r in runs for s in r.get("skipped", [])]}
    for r in runs:
        if any(r["config"][k] != first[k] for k in key):
            raise ValueError(f"runs differ in {[k for k in key if r['config'][k] != first[k]]}: cannot pair them")
        for name, cfg in r["config"]["methods"].items():
            out["config"]["methods"].setdefault(name, cfg)
        for n, per in r["cells"].items():
            for fam, cell in per.items():
                dst = out["cells"].setdefault(n, {}).setdefault(fam, {**cell, "methods": {}})
                for name, rec in cell["methods"].items():
                    dst["methods"].setdefault(name, rec)
    for per in out["cells"].values():
        for cell in per.values():
            cell["paired"] = fidelity.paired(cell["methods"], PAIRS)
    return out


def make_report(paths: list[str], out: str) -> None:
    """Merged JSON, markdown tables and plots of the families and pipeline runs in `paths`."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    fams = [r for r in runs if "cells" in r]
    rows = {}
    for r in runs:
        for row in r.get("results", []):
            rows.setdefault((row["method"], row["task"], row["length"]), row)
    if len(fams) + sum("results" in r for r in runs) < len(runs):
        raise SystemExit("--report takes families.json and pipeline results.json files")
    parts = []
    if fams:
        res = merge_families(fams)
        report.write_json(res, os.path.join(out, "families.json"))
        write_families(res, out)
        parts.append(families_tables(res))
    if rows:
        rows = list(rows.values())
        report.write_json({"results": rows}, os.path.join(out, "pipeline.json"))
        runner.plot_accuracy(rows, os.path.join(out, "pipeline.png"), title="95% intervals")
        parts.append(pipeline_table(rows))
        with open(os.path.join(out, "pipeline.md"), "w") as f:
            f.write(parts[-1])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n\n".join(parts))
    print("\n\n".join(parts))


STAGES = {"families": stage_families, "backends": stage_backends, "pipeline": stage_pipeline}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="families,pipeline", help=f"comma-separated, from {sorted(STAGES)}")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 on the CPU")
    ap.add_argument("--kernel-backend", default=None, choices=["gpu", "tpu", "xla"],
                    help="kernel path of the sparse methods (default: Pallas on GPU/TPU)")
    ap.add_argument("--lengths", default="4000,8000")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="prose,kv,code,qa,records", help=f"from {FAMILIES}")
    ap.add_argument("--methods", default=CORRECTIONS, help="prefill corrections compared with dense")
    ap.add_argument("--exact", type=int, default=EXACT, help="exact last rows (the recall tail is shorter)")
    ap.add_argument("--shift-samples", type=int, default=8, help="prose texts of the backends stage's shift")
    ap.add_argument("--start-fraction", type=float, default=0.5, help="body NLL from this fraction of the body")
    ap.add_argument("--pipeline", default="dense,published,taylor_cal", help=f"from {sorted(PIPELINE)}")
    ap.add_argument("--tasks", default="niah_multivalue_list,niah_multivalue")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new work starts")
    ap.add_argument("--smoke", action="store_true", help="CPU check: 1024 tokens, 2 samples, one family, one task")
    ap.add_argument("--report", nargs="+", default=None, help="JSON files to merge into tables and plots")
    ap.add_argument("--out", default="runs/study")
    a = ap.parse_args(argv)
    if a.report:
        make_report(a.report, a.out)
        return
    if a.smoke:
        a.lengths, a.samples, a.batch_size, a.shift_samples = "1024", 2, 2, 1
        a.families, a.tasks = "code", "niah_multivalue_list"
    stages = a.stage.split(",")
    bad = [s for s in stages if s not in STAGES] + [f for f in a.families.split(",") if f not in FAMILIES] + \
        [p for p in a.pipeline.split(",") if p not in PIPELINE]
    if bad:
        raise SystemExit(f"unknown stages, families or pipelines {bad}; stages {sorted(STAGES)}, families "
                         f"{FAMILIES}, pipelines {sorted(PIPELINE)}")
    pick(a.methods)
    run_stages(STAGES, stages, a)


if __name__ == "__main__":
    main()

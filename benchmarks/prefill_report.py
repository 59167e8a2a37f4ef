"""Delta Attention on the real model: merge the runs of `real_model_eval.py`, then tables, plots and the
cause analysis (issue 8).

Inputs are the JSON files the driver wrote (several runs of a stage merge, later runs adding methods);
outputs go to --out: merged `shift.json`, `fidelity.json`, `tasks.json`, `sweep_shift.json`,
`sweep_fidelity.json`, the plots and `summary.md` (the tables quoted in the README).

    python benchmarks/prefill_report.py --shift a/shift.json b/shift.json --fidelity f.json \
        --tasks t1.json t2.json --sweep-shift s.json --sweep-fidelity sf.json \
        --transfer delta_transfer.json --out benchmarks/results/real_model/prefill
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from delta_jax.eval import report  # noqa: E402
from delta_jax.eval.runner import depth_breakdown, plot_accuracy  # noqa: E402

MAIN = ("window", "recompute", "delta", "delta_smooth", "delta_shrink", "delta_taylor")
EXTRA = ("delta_fitted", "delta_gated", "delta_nd", "delta_mix", "delta_dense2", "recompute_dense2",
         "delta_shrink_dense2")


def load(paths):
    return [json.load(open(p)) for p in paths or ()]


def merge_lengths(runs: list[dict]) -> dict:
    """Merges `{"lengths": {n: {name: record}}}` runs; a method present in several runs keeps the first."""
    out = {"env": [r.get("env") for r in runs], "lengths": {}}
    for r in runs:
        for n, per in r["lengths"].items():
            dst = out["lengths"].setdefault(n, {})
            for k, v in per.items():
                if isinstance(v, dict) and k in ("kl", "nll"):
                    dst.setdefault(k, {})
                    for name, rec in v.items():
                        dst[k].setdefault(name, rec)
                else:
                    dst.setdefault(k, v)
    return out


def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def shift_table(shift: dict, names) -> str:
    lengths = sorted(shift["lengths"], key=int)
    lines = ["| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name in names:
        cells = []
        for n in lengths:
            rec = shift["lengths"][n].get(name)
            cells.append("" if rec is None else f"{rec['overall']:.4f} ± {rec['overall_ci95']:.4f}")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(fid: dict, names) -> str:
    lengths = sorted(fid["lengths"], key=int)
    lines = ["| method | " + " | ".join(f"KL {n}" for n in lengths) + " | "
             + " | ".join(f"NLL {n}" for n in lengths) + " |", "|---|" + "---:|" * (2 * len(lengths))]
    dense = " | ".join(fmt(fid["lengths"][n]["nll"]["dense"]["nll"]["mean"]) for n in lengths)
    lines.append("| dense | " + " | ".join("0" for _ in lengths) + " | " + dense + " |")
    for name in names:
        kl = [fid["lengths"][n]["kl"].get(name) for n in lengths]
        nll = [fid["lengths"][n]["nll"].get(name) for n in lengths]
        if not any(kl):
            continue
        kcells = [f"{k['kl']['mean']:.4f} [{k['kl']['ci_low']:.4f}, {k['kl']['ci_high']:.4f}]" if k else ""
                  for k in kl]
        ncells = [fmt(x["nll"]["mean"]) if x else "" for x in nll]
        lines.append(f"| {name} | " + " | ".join(kcells) + " | " + " | ".join(ncells) + " |")
    return "\n".join(lines)


def sweep_table(shift: dict, fid: dict) -> str:
    n = next(iter(shift["lengths"]))
    per, kl = shift["lengths"][n], fid["lengths"].get(n, {}).get("kl", {})
    settings = list(dict.fromkeys(k.split(" ", 1)[1] for k in per))
    kinds = list(dict.fromkeys(k.split(" ", 1)[0] for k in per))
    lines = [f"| window, sinks, gamma ({n} tokens) | " + " | ".join(f"cos {k}" for k in kinds) + " | "
             + " | ".join(f"KL {k}" for k in kinds) + " |", "|---|" + "---:|" * (2 * len(kinds))]
    for s in settings:
        cos = [fmt(per.get(f"{k} {s}", {}).get("overall"), 4) for k in kinds]
        kls = [fmt(kl.get(f"{k} {s}", {}).get("kl", {}).get("mean"), 4) for k in kinds]
        lines.append(f"| {s} | " + " | ".join(cos) + " | " + " | ".join(kls) + " |")
    return "\n".join(lines)


def per_head_analysis(shift: dict, transfer: dict | None) -> tuple[dict, str]:
    """Where the corrections raise or lower the cosine against the same exact rows without correction
    (recompute): per layer and head, at every length; with the delta-transfer error per head if given."""
    out, lines = {}, []
    for n, per in sorted(shift["lengths"].items(), key=lambda x: int(x[0])):
        base = np.asarray(per["recompute"]["per_head"])
        rec = {}
        for name in ("delta", "delta_shrink", "delta_taylor"):
            if name not in per:
                continue
            gain = np.asarray(per[name]["per_head"]) - base                              # [L, H]
            worst = np.unravel_index(np.argsort(gain, axis=None)[:5], gain.shape)
            rec[name] = {"gain": gain.tolist(), "heads_worse": float((gain < 0).mean()),
                         "layer_gain": gain.mean(1).tolist(),
                         "worst": [[int(a), int(b), float(gain[a, b])] for a, b in zip(*worst)]}
            lines.append(f"- {n} tokens, {name} vs recompute: worse in {100 * (gain < 0).mean():.0f}% of the "
                         f"{gain.size} (layer, head) pairs; layer mean gain from {gain.mean(1).min():+.4f} "
                         f"(layer {int(gain.mean(1).argmin())}) to {gain.mean(1).max():+.4f} "
                         f"(layer {int(gain.mean(1).argmax())}); worst (layer, head): "
                         + ", ".join(f"({a}, {b}) {g:+.3f}" for a, b, g in rec[name]["worst"][:3]))
        out[n] = rec
    if transfer:
        tl = next(iter(transfer["lengths"]))
        n = min(shift["lengths"], key=lambda x: abs(int(x) - int(tl)))
        if "delta" in out.get(n, {}):
            err = np.asarray([lay["lags"]["32"]["per_head_median_rel_error"] for lay in transfer["lengths"][tl]])
            gain = np.asarray(out[n]["delta"]["gain"])
            r = float(np.corrcoef(err.ravel(), gain.ravel())[0, 1])
            out["transfer_correlation"] = {"shift_length": n, "transfer_length": tl, "pearson_r": r}
            lines.append(f"- per (layer, head), the published delta's cosine gain over recompute at {n} tokens "
                         f"against the median relative transfer error at lag 32 ({tl} tokens): Pearson r = {r:+.2f}")
            far = [lay["lags"]["32"]["far_term_rel_change"] for lay in transfer["lengths"][tl]]
            loc = [lay["lags"]["32"]["local_term_rel_change"] for lay in transfer["lengths"][tl]]
            out["term_changes"] = {"far": far, "local": loc}
            lines.append(f"- transfer error split at lag 32 (median over rows, relative to |c(t)|, layer "
                         f"mean): far term m(t) far(t) changes by {np.mean(far):.2f}, local term "
                         f"m(t) sparse(t) by {np.mean(loc):.2f}; far > local in "
                         f"{sum(f > l for f, l in zip(far, loc))} of {len(far)} layers")
    return out, "\n".join(lines)


def plots(shift, sweep_shift, heads, out):
    plt = report._pyplot()
    paths = []
    for n, per in shift["lengths"].items():
        paths.append(report.plot_layers({k: np.asarray(per[k]["mean"]) for k in MAIN if k in per},
                                        os.path.join(out, f"shift_{n}.png"), ylabel="mean cosine to dense",
                                        title=f"SmolLM2-135M, {n} tokens, window 256, sinks 16, gamma 64"))
    n = max(shift["lengths"], key=int)
    per = shift["lengths"][n]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ("recompute", "delta", "delta_shrink", "delta_taylor"):
        if k in per:
            lag = np.asarray([[np.nan if x is None else x for x in row] for row in per[k]["by_lag"]], float)
            ax.plot(np.arange(lag.shape[1]), np.nanmean(lag, 0), label=k)
    ax.set_xlabel("distance from the sampled row (t mod gamma)")
    ax.set_ylabel("cosine to dense (layer mean)")
    ax.set_title(f"{n} tokens: how far a sampled row's correction carries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"shift_by_lag_{n}.png"), dpi=120)
    plt.close(fig)
    rec = heads.get(n, {})
    names = [k for k in ("delta", "delta_taylor") if k in rec]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 6), squeeze=False)
        for ax, k in zip(axes[0], names):
            g = np.asarray(rec[k]["gain"])
            lim = np.abs(g).max()
            im = ax.imshow(g, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_title(f"{k} - recompute, {n} tokens")
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"per_head_gain_{n}.png"), dpi=120)
        plt.close(fig)
    if sweep_shift:
        m = next(iter(sweep_shift["lengths"]))
        per = sweep_shift["lengths"][m]
        settings = list(dict.fromkeys(k.split(" ", 1)[1] for k in per))
        kinds = list(dict.fromkeys(k.split(" ", 1)[0] for k in per))
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(settings))
        for i, k in enumerate(kinds):
            ax.bar(x + i * 0.8 / len(kinds), [per.get(f"{k} {s}", {}).get("overall", np.nan) for s in settings],
                   0.8 / len(kinds), label=k)
        ax.set_xticks(x + 0.4 - 0.4 / len(kinds))
        ax.set_xticklabels(settings, rotation=20, fontsize=8)
        ax.set_ylim(0.7, 1.0)
        ax.set_ylabel("mean cosine to dense")
        ax.set_title(f"sweep at {m} tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "sweep_shift.png"), dpi=120)
        plt.close(fig)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("shift", "fidelity", "tasks", "sweep-shift", "sweep-fidelity"):
        ap.add_argument(f"--{name}", nargs="*", default=[])
    ap.add_argument("--transfer", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    shift, fid = merge_lengths(load(a.shift)), merge_lengths(load(a.fidelity))
    sweep_shift = merge_lengths(load(a.sweep_shift)) if a.sweep_shift else None
    sweep_fid = merge_lengths(load(a.sweep_fidelity)) if a.sweep_fidelity else None
    transfer = json.load(open(a.transfer)) if a.transfer else None
    rows = [r for t in load(a.tasks) for r in t["results"]]
    tasks = {"results": rows, "table": report.markdown_table(rows)}
    tasks["by_depth"] = depth_breakdown(tasks)
    heads, cause = per_head_analysis(shift, transfer)
    for obj, name in ((shift, "shift"), (fid, "fidelity"), (tasks, "tasks"), (sweep_shift, "sweep_shift"),
                      (sweep_fid, "sweep_fidelity"), ({"per_length": heads}, "per_head")):
        if obj:
            report.write_json(obj, os.path.join(a.out, f"{name}.json"))
    if rows:
        plot_accuracy(rows, os.path.join(a.out, "tasks.png"), title="50 samples per point, 95% intervals")
    plots(shift, sweep_shift, heads, a.out)
    summary = ["## Shift (mean cosine to dense, ± 95% half-width over samples)", shift_table(shift, MAIN + EXTRA),
               "", "Authors' proportions (window + sinks = 3/4 of the prompt):",
               shift_table(shift, [f"{k} 3/4" for k in ("recompute", "delta", "delta_shrink", "delta_taylor")]),
               "", "## Fidelity (KL over the recall tail [95% CI]; NLL of the second half of prose)",
               fidelity_table(fid, MAIN + EXTRA), "", "## Tasks", tasks["table"], "", "## Per head", cause]
    if sweep_shift and sweep_fid:
        summary += ["", "## Sweep", sweep_table(sweep_shift, sweep_fid)]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()

"""Output helpers: JSON writing, progress bars, markdown tables and plots (matplotlib, Agg backend)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Optional

import numpy as np


def jsonable(x):
    """Converts numpy arrays/scalars, dataclasses and tuples into JSON types (NaN/inf become null)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def write_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=1)
    return path


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(*, total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, or a no-op when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def markdown_table(rows: list[dict]) -> str:
    """`method | task | <length> ...` table of "acc ± half-width" (percent; the half-width of the 95% interval,
    whose exact bounds are in the JSON), with a per-method mean row over tasks when there are several."""
    if not rows:
        return ""
    lengths = sorted({r["length"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["method"], r["task"], r["length"]): r for r in rows}
    head = "| method | task | " + " | ".join(str(n) for n in lengths) + " |"
    sep = "|---|---|" + "---:|" * len(lengths)
    lines = [head, sep]
    for m in methods:
        for t in tasks:
            vals = []
            for n in lengths:
                r = cell.get((m, t, n))
                vals.append("" if r is None else
                            f"{100 * r['accuracy']:.1f} ± {50 * (r['ci_high'] - r['ci_low']):.1f}")
            lines.append(f"| {m} | {t} | " + " | ".join(vals) + " |")
        if len(tasks) > 1:
            vals = []
            for n in lengths:
                accs = [cell[(m, t, n)]["accuracy"] for t in tasks if (m, t, n) in cell]
                vals.append(f"{100 * float(np.mean(accs)):.1f}" if accs else "")
            lines.append(f"| {m} | *mean* | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: str, title: Optional[str] = None) -> str:
    """Accuracy by prompt length, one panel per task, one line per method, 95% intervals as error bars."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(3, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in methods:
            rs = sorted((r for r in rows if r["task"] == task and r["method"] == m), key=lambda r: r["length"])
            if not rs:
                continue
            x = [r["length"] for r in rs]
            y = np.array([r["accuracy"] for r in rs])
            err = np.array([[a - r["ci_low"] for a, r in zip(y, rs)], [r["ci_high"] - a for a, r in zip(y, rs)]])
            ax.errorbar(x, 100 * y, yerr=100 * np.maximum(err, 0), marker="o", capsize=3, label=m)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(curves: dict[str, np.ndarray], path: str, *, ylabel: str, title: Optional[str] = None) -> str:
    """One line per method over layers (x: layer index)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, y in curves.items():
        y = np.asarray(y, np.float64)
        ax.plot(np.arange(len(y)), y, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

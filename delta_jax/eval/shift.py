"""Per-layer distribution-shift diagnostic: how far each method's attention outputs drift from dense.

Each method runs its own forward pass (`engine.attention_outputs`), so a shift in early layers carries
into later ones. Per layer the cosine similarity of every row's output to dense is taken per head, then
averaged: over all rows (`mean_all`) and over the rows whose window misses context, `t >= window + sinks`
(`mean_miss`, with its 5th percentile `p05_miss` and the per-head matrix `per_head_miss [layers, heads]`).
`spearman=True` adds the Spearman rank correlation of the head_dim components of each output row (a
robust companion of the cosine; the paper's score-level Spearman needs attention scores the engine does
not expose).

- `cosine_rows(a, b)`, `spearman_rows(a, b)`: along the last axis, in float64.
- `shift_diagnostic(engine, methods, length=, samples=)` -> dict per method.
- `run_shift(engine, methods=, lengths=, out_dir=)`: writes `shift.json`, `shift_<length>.png` (mean cosine
  over the missing rows per layer, one line per method) and `shift_rows_<length>.npz` (per-row cosines).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from delta_jax.config import PrefillConfig
from delta_jax.eval import methods as methods_lib


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """Cosine similarity along the last axis (float64). Two zero rows give 1; one zero row gives 0."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    nx = np.linalg.norm(x, axis=-1)
    ny = np.linalg.norm(y, axis=-1)
    dot = (x * y).sum(-1)
    cos = dot / np.maximum(nx * ny, eps)
    both_zero = (nx == 0) & (ny == 0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (no tie correction; float inputs rarely tie)."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), 1.0)


def miss_start(prefill: PrefillConfig) -> int:
    """First row whose sparse window misses context: `window + sinks` (0 for dense)."""
    return 0 if prefill.method == "dense" else prefill.window + prefill.sinks


def shift_diagnostic(engine, methods: dict, *, length: int, samples: int = 1, seed: int = 0,
                     texts: Optional[list[list[int]]] = None, rows_from: Optional[int] = None,
                     spearman: bool = False) -> dict:
    """Per-layer cosine (and optionally Spearman) of each method's attention outputs to dense.

    `texts`: token sequences (default: built-in prose of `length` tokens). `rows_from`: a common first
    "missing" row for every method (default: each method's own `window + sinks`).
    Returns `{"length", "samples", "methods": {name: {"rows_from", "mean_all" [L], "mean_miss" [L],
    "p05_miss" [L], "median_miss" [L], "per_head_miss" [L, H], "per_head_all" [L, H], "rows" [L, T]
    (mean over heads and samples), and "spearman_*" likewise}}}`.
    """
    from delta_jax.eval.fidelity import _check_length, prose_tokens
    methods_lib.check_methods(methods)
    if texts is None:
        _check_length(engine, length)
        texts = prose_tokens(engine.tokenizer, length=length, n=samples, seed=seed)
    if len({len(t) for t in texts}) != 1:
        raise ValueError(f"shift texts must share one length, got {sorted({len(t) for t in texts})}")
    prefills = {n: methods_lib.resolve(n, s, length)[0] for n, s in methods.items()}
    dense = PrefillConfig(method="dense")
    cos: dict[str, list] = {n: [] for n in prefills}
    rank: dict[str, list] = {n: [] for n in prefills}
    for toks in texts:
        ref = np.asarray(engine.attention_outputs(toks, prefill=dense), np.float64)
        for name, pre in prefills.items():
            out = ref if pre.method == "dense" else np.asarray(engine.attention_outputs(toks, prefill=pre))
            if out.shape != ref.shape:
                raise ValueError(f"method {name!r}: attention outputs of shape {out.shape}, dense {ref.shape}")
            cos[name].append(cosine_rows(out, ref))
            if spearman:
                rank[name].append(spearman_rows(out, ref))
    result = {"length": len(texts[0]), "samples": len(texts), "methods": {}}
    for name, pre in prefills.items():
        start = miss_start(pre) if rows_from is None else rows_from
        rec = {"prefill": dataclasses.asdict(pre), "rows_from": start,
               "rows": np.mean(np.stack(cos[name]), axis=(0, 3))}
        rec.update(_summary_stacked(cos[name], start))
        if spearman:
            rec.update({f"spearman_{k}": v for k, v in _summary_stacked(rank[name], start).items()})
        result["methods"][name] = rec
    return result


def _summary_stacked(per_sample: list[np.ndarray], start: int) -> dict:
    """Statistics over all samples: the missing rows of each sample are pooled."""
    all_rows = np.concatenate(per_sample, axis=1)
    out = {"mean_all": all_rows.mean(axis=(1, 2)), "per_head_all": all_rows.mean(axis=1)}
    miss = np.concatenate([c[:, start:] for c in per_sample], axis=1)
    if miss.shape[1]:
        flat = miss.reshape(miss.shape[0], -1)
        out.update(mean_miss=flat.mean(1), p05_miss=np.quantile(flat, 0.05, axis=1),
                   median_miss=np.median(flat, axis=1), per_head_miss=miss.mean(axis=1))
    return out


def run_shift(engine, *, methods: dict, lengths: Sequence[int], samples: int = 1, seed: int = 0,
              rows_from: Optional[int] = None, spearman: bool = False, out_dir: Optional[str] = None,
              progress: bool = True) -> dict:
    """`shift_diagnostic` for every length; writes JSON, one PNG per length and per-row cosines (npz)."""
    from delta_jax.eval.report import plot_layers, progress_bar, write_json
    bar = progress_bar(total=len(lengths), desc="shift", enabled=progress)
    results = []
    for length in lengths:
        res = shift_diagnostic(engine, methods, length=length, samples=samples, seed=seed,
                               rows_from=rows_from, spearman=spearman)
        results.append(res)
        bar.update(1)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            curves = {n: m.get("mean_miss", m["mean_all"]) for n, m in res["methods"].items()
                      if m["prefill"]["method"] != "dense"}
            if curves:
                plot_layers(curves, os.path.join(out_dir, f"shift_{length}.png"),
                            ylabel="mean cosine to dense (rows t >= window + sinks)",
                            title=f"attention-output shift, {length} tokens, {samples} sample(s)")
            np.savez_compressed(os.path.join(out_dir, f"shift_rows_{length}.npz"),
                                **{n: m["rows"] for n, m in res["methods"].items()})
    bar.close()
    out = {"lengths": list(lengths), "results": [
        {**r, "methods": {n: {k: v for k, v in m.items() if k != "rows"} for n, m in r["methods"].items()}}
        for r in results]}
    if out_dir:
        write_json(out, os.path.join(out_dir, "shift.json"))
    return {"lengths": list(lengths), "results": results}

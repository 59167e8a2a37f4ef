"""Task-accuracy evaluations over methods, tasks and lengths, with 95% intervals, JSON, plots and a table.

Functions (keyword arguments only after the engine; a CLI calls them directly):

- `run_eval(engine, *, tasks, lengths, methods, samples, seed=0, out_dir=None, progress=True, chat=False,
  batch_size=8, max_new_tokens=None, task_kwargs=None, depth_range=(0, 1))` -> results dict.
  `methods`: name -> `(PrefillConfig, DecodeConfig)`, a bare `PrefillConfig`, or a callable
  `length -> (PrefillConfig, DecodeConfig)`. The same samples (made once per task and length with the
  engine's tokenizer) go to every method, greedy, in batches of `batch_size`. Accuracy per (method, task,
  length) = expected values found in the outputs / expected values (RULER's string match), with a Wilson
  interval for single-answer tasks and a bootstrap over samples for multi-answer ones.
  Writes `out_dir/results.json`, `results.md` (table) and `accuracy.png` (accuracy by length per method,
  one panel per task, error bars = 95% intervals).
- `run_sweep(engine, *, tasks, lengths, windows, sinks, gammas, kinds=("window", "delta"), authors=True,
  recompute=True, tail=None, decode=None, dense=True, **run_eval_kwargs)`: `run_eval` over the grid of
  `methods.sweep_methods` (authors=True adds window + sinks covering 3/4 of each prompt).
- `depth_breakdown(results, bins=4)`: accuracy per needle-depth bin (a needle near the end sits in the
  exact tail or the window, so single-needle accuracy alone says little about a sparse method).
- `delta_jax.eval.fidelity.run_fidelity(engine, *, methods, lengths, samples, out_dir)`: KL to dense over a
  recall tail and perplexity (`fidelity.json`).
- `delta_jax.eval.shift.run_shift(engine, *, methods, lengths, samples, out_dir)`: per-layer cosine of
  attention outputs to dense (`shift.json`, `shift_<length>.png`).

The result dict: `{"meta": {...}, "methods": {name: {length: {"prefill", "decode"}}}, "results": [row, ...],
"table": markdown, "by_depth": depth_breakdown(...)}`, each row `{"method", "task", "length", "accuracy",
"ci_low", "ci_high", "ci_method",
"hits", "total", "n", "mean_prompt_tokens", "mean_prefill_seconds", "samples": [per-sample records]}`.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Optional, Sequence

import numpy as np

from delta_jax.config import DecodeConfig
from delta_jax.eval import methods as methods_lib
from delta_jax.eval.report import markdown_table, plot_accuracy, progress_bar, write_json
from delta_jax.eval.stats import accuracy_interval
from delta_jax.eval.tasks import TASKS, hits_of, make_samples, score_text


def run_eval(engine, *, tasks: Sequence[str], lengths: Sequence[int], methods: dict, samples: int,
             seed: int = 0, out_dir: Optional[str] = None, progress: bool = True, chat: bool = False,
             batch_size: int = 8, max_new_tokens: Optional[int] = None, task_kwargs: Optional[dict] = None,
             depth_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Accuracy of every method on every task and length (see the module docstring)."""
    tasks, lengths = list(tasks), [int(n) for n in lengths]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"unknown or no tasks {bad or tasks}; choose from {sorted(TASKS)}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples={samples} and batch_size={batch_size} must be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    methods_lib.check_methods(methods)
    task_kwargs = task_kwargs or {}
    unknown = set(task_kwargs) - set(tasks)
    if unknown:
        raise ValueError(f"task_kwargs names tasks not evaluated: {sorted(unknown)}")
    if engine.tokenizer is None:
        raise ValueError("the engine has no tokenizer; task prompts are text")
    cap = getattr(engine, "max_seq_len", None)
    for t in tasks:
        need = max(lengths) + (max_new_tokens or TASKS[t].max_new_tokens)
        if cap is not None and need > cap:
            raise ValueError(f"task {t!r} at length={max(lengths)} needs {need} tokens with its answer, "
                             f"more than the engine's max_seq_len={cap}")

    resolved = {name: {n: methods_lib.resolve(name, spec, n) for n in lengths} for name, spec in methods.items()}
    for name, per in resolved.items():
        num_layers = getattr(getattr(engine, "config", None), "num_layers", None)
        for pre, dec in per.values():
            if dec.method == "delta" and num_layers is not None:
                try:
                    dec.schedule(num_layers)
                except ValueError as e:
                    raise ValueError(f"method {name!r}: {e}") from None

    bar = progress_bar(total=len(methods) * len(tasks) * len(lengths) * samples, desc="eval", enabled=progress)
    rows = []
    t_start = time.time()
    for task in tasks:
        for n in lengths:
            sample_list = make_samples(task, engine.tokenizer, length=n, n=samples, seed=seed, chat=chat,
                                       depth_range=depth_range, **task_kwargs.get(task, {}))
            new_tokens = max_new_tokens or TASKS[task].max_new_tokens
            for name in methods:
                pre, dec = resolved[name][n]
                bar.set_postfix_str(f"{task} {n} {name}")
                recs, prefill_s = [], []
                for i in range(0, len(sample_list), batch_size):
                    batch = sample_list[i:i + batch_size]
                    outs = engine.generate([s.tokens for s in batch], max_new_tokens=new_tokens, chat=False,
                                           temperature=0.0, seed=seed, prefill=pre, decode=dec)
                    for s, o in zip(batch, outs):
                        score = score_text(o.text, s.answers, s.metric)
                        h, total = (hits_of(o.text, s.answers), len(s.answers)) if s.metric == "all" else \
                            (int(score), 1)
                        recs.append({**s.record(), "output": o.text, "hits": h, "trials": total, "score": score})
                        prefill_s.append(float(getattr(o, "prefill_seconds", float("nan"))))
                    bar.update(len(batch))
                row = {"method": name, "task": task, "length": n,
                       **accuracy_interval([r["hits"] for r in recs], [r["trials"] for r in recs],
                                           seed=seed),
                       "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in recs])),
                       "mean_prefill_seconds": float(np.nanmean(prefill_s)) if prefill_s else None,
                       "samples": recs}
                rows.append(row)
    bar.close()
    results = {
        "meta": {"tasks": tasks, "lengths": lengths, "samples": samples, "seed": seed, "chat": chat,
                 "batch_size": batch_size, "max_new_tokens": max_new_tokens, "task_kwargs": task_kwargs,
                 "depth_range": list(depth_range), "model": _model_meta(engine),
                 "seconds": time.time() - t_start, "host": platform.node()},
        "methods": {name: {str(n): methods_lib.describe(*pd) for n, pd in per.items()}
                    for name, per in resolved.items()},
        "results": rows,
        "table": markdown_table(rows),
    }
    results["by_depth"] = depth_breakdown(results)
    if out_dir:
        write_outputs(results, out_dir)
    return results


def write_outputs(results: dict, out_dir: str) -> dict:
    """Writes `results.json`, `results.md` and `accuracy.png` into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": write_json(results, os.path.join(out_dir, "results.json"))}
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(results["table"] + "\n")
    paths["markdown"] = md
    paths["plot"] = plot_accuracy(results["results"], os.path.join(out_dir, "accuracy.png"),
                                  title=f"{results['meta']['samples']} samples per point, 95% intervals")
    return paths


def _model_meta(engine) -> dict:
    cfg = getattr(engine, "config", None)
    out = {"max_seq_len": getattr(engine, "max_seq_len", None)}
    for k in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
        if cfg is not None and hasattr(cfg, k):
            out[k] = getattr(cfg, k)
    dtype = getattr(engine, "dtype", None)
    if dtype is not None:
        out["dtype"] = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    return out


def run_sweep(engine, *, tasks: Sequence[str], lengths: Sequence[int], windows: Sequence[int] = (256,),
              sinks: Sequence[int] = (16,), gammas: Sequence[int] = (64,),
              kinds: Sequence[str] = ("window", "delta"), authors: bool = True, recompute: bool = True,
              tail: Optional[int] = None, decode: Optional[DecodeConfig] = None, dense: bool = True,
              **run_eval_kwargs) -> dict:
    """`run_eval` over window x sinks x gamma (and the authors' 3/4 proportions) for every length."""
    grid = methods_lib.sweep_methods(windows=windows, sinks=sinks, gammas=gammas, kinds=kinds, tail=tail,
                                     recompute=recompute, dense=dense, authors=authors, decode=decode)
    return run_eval(engine, tasks=tasks, lengths=lengths, methods=grid, **run_eval_kwargs)


def depth_breakdown(results: dict, bins: int = 4) -> list[dict]:
    """Accuracy per needle-depth bin for every (method, task, length) row of `run_eval`'s results: a sample
    goes to the bin of its deepest asked needle (the one furthest from the question), `depth` in [0, 1]."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    out = []
    for row in results["results"]:
        groups: dict[int, list] = {}
        for s in row["samples"]:
            if s.get("depths"):
                b = min(bins - 1, int(min(s["depths"]) * bins))
                groups.setdefault(b, []).append(s)
        for b in sorted(groups):
            g = groups[b]
            out.append({"method": row["method"], "task": row["task"], "length": row["length"],
                        "depth_low": b / bins, "depth_high": (b + 1) / bins, "n": len(g),
                        "accuracy": float(np.mean([s["score"] for s in g]))})
    return out

"""Arguments and entry points of `delta-jax eval` and `delta-jax shift` (called from `delta_jax.cli`).

Methods are given as `--method NAME=PREFILL[:k=v,...][/DECODE[:k=v,...]]` (repeatable), e.g.
`--method "delta=delta:window=256,sinks=16,gamma=64"`, `--method "delta-dec=dense/delta:budget=64"`,
or as a grid with `--sweep --windows 256,1024 --sinks 16 --gammas 16,64 [--authors]`.
"""

from __future__ import annotations

import argparse
import os
import sys

from delta_jax.config import PrefillConfig
from delta_jax.eval import methods as methods_lib
from delta_jax.eval.tasks import TASKS

DEFAULT_TASKS = "niah_single,niah_multikey_2,niah_multivalue,variable_tracking"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_common(p: argparse.ArgumentParser, lengths: str, samples: int, out: str):
    p.add_argument("--lengths", type=_ints, default=_ints(lengths),
                   help=f"prompt lengths in tokens (default {lengths})")
    p.add_argument("--samples", type=int, default=samples, help=f"samples per point (default {samples})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--method", action="append", default=None, metavar="SPEC",
                   help="NAME=PREFILL[:k=v,...][/DECODE[:k=v,...]] (repeatable)")
    p.add_argument("--sweep", action="store_true", help="methods from the grid below instead of --method")
    p.add_argument("--windows", type=_ints, default=(256,), help="sweep windows (default 256)")
    p.add_argument("--sinks", type=_ints, default=(16,), help="sweep sink counts (default 16)")
    p.add_argument("--gammas", type=_ints, default=(64,), help="sweep gammas (default 64)")
    p.add_argument("--tail", type=int, default=None, help="exact tail rows in the sweep (default: the authors')")
    p.add_argument("--authors", action="store_true", help="add window + sinks covering 3/4 of the prompt")
    p.add_argument("--no-progress", action="store_true")


def add_eval_args(p: argparse.ArgumentParser):
    _add_common(p, "1024,4096", 16, "runs/eval")
    p.add_argument("--tasks", type=_names, default=_names(DEFAULT_TASKS),
                   help=f"comma-separated, from: {', '.join(TASKS)} (default {DEFAULT_TASKS})")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task")
    p.add_argument("--fidelity", action="store_true", help="also KL to dense over a recall tail, and perplexity")
    p.add_argument("--no-tasks", action="store_true", help="skip the tasks (with --fidelity)")


def add_shift_args(p: argparse.ArgumentParser):
    _add_common(p, "2048", 1, "runs/shift")
    p.add_argument("--rows-from", type=int, default=None,
                   help="first row counted as missing context for every method (default: window + sinks)")
    p.add_argument("--spearman", action="store_true", help="also Spearman rank correlation per row")


def methods_from_args(a: argparse.Namespace, include_dense: bool = True) -> dict:
    if a.sweep:
        return methods_lib.sweep_methods(windows=a.windows, sinks=a.sinks, gammas=a.gammas, tail=a.tail,
                                         authors=a.authors, dense=include_dense)
    if a.method:
        out = dict(methods_lib.parse_method(s) for s in a.method)
        if len(out) != len(a.method):
            raise ValueError(f"method names repeat in {a.method}")
        return out
    out = {"dense": PrefillConfig(method="dense")} if include_dense else {}
    out["window"] = PrefillConfig(method="window")
    out["delta"] = PrefillConfig(method="delta")
    return out


def run_eval_cli(a: argparse.Namespace, engine) -> dict:
    from delta_jax.eval.fidelity import run_fidelity
    from delta_jax.eval.runner import run_eval
    methods = methods_from_args(a)
    out = {}
    if not a.no_tasks:
        out["tasks"] = run_eval(engine, tasks=a.tasks, lengths=a.lengths, methods=methods, samples=a.samples,
                                seed=a.seed, out_dir=a.out, progress=not a.no_progress, chat=a.chat,
                                batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
        print(out["tasks"]["table"])
    if a.fidelity:
        out["fidelity"] = run_fidelity(engine, methods=methods, lengths=a.lengths, samples=a.samples,
                                       seed=a.seed, batch_size=a.batch_size, out_dir=a.out,
                                       progress=not a.no_progress)
        for r in out["fidelity"]["kl"]:
            for name, m in r["methods"].items():
                print(f"{r['length']:>7} {name:<24} KL {m['kl']['mean']:.4f} "
                      f"[{m['kl']['ci_low']:.4f}, {m['kl']['ci_high']:.4f}]  value top-1 {m['value_top1']:.3f}")
    print(f"results in {os.path.abspath(a.out)}", file=sys.stderr)
    return out


def run_shift_cli(a: argparse.Namespace, engine) -> dict:
    from delta_jax.eval.shift import run_shift
    methods = methods_from_args(a, include_dense=False)
    res = run_shift(engine, methods=methods, lengths=a.lengths, samples=a.samples, seed=a.seed,
                    rows_from=a.rows_from, spearman=a.spearman, out_dir=a.out, progress=not a.no_progress)
    for r in res["results"]:
        for name, m in r["methods"].items():
            curve = m.get("mean_miss", m["mean_all"])
            print(f"{r['length']:>7} {name:<24} " + " ".join(f"{v:.3f}" for v in curve))
    print(f"results in {os.path.abspath(a.out)}", file=sys.stderr)
    return res

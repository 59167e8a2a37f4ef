"""Long-context evaluation: RULER-style tasks, fidelity to dense (KL, perplexity) on text families with an
exact recall tail, the per-layer distribution-shift diagnostic, sweeps with 95% intervals, JSON, markdown
and plots.

    from delta_jax.eval import run_eval, run_sweep, run_fidelity, run_shift, make_samples
    res = run_eval(engine, tasks=["niah_single"], lengths=[4096], samples=50,
                   methods={"dense": (PrefillConfig(), DecodeConfig()),
                            "delta": (PrefillConfig(method="delta", window=256, sinks=16), DecodeConfig())},
                   out_dir="runs/eval")
"""

from delta_jax.eval.families import FAMILIES, family_samples
from delta_jax.eval.fidelity import (family_fidelity, kl_divergence, kl_fidelity, perplexity, recall_samples,
                                     run_fidelity)
from delta_jax.eval.methods import authors_proportions, parse_method, sweep_methods
from delta_jax.eval.runner import depth_breakdown, run_eval, run_sweep
from delta_jax.eval.shift import cosine_rows, run_shift, shift_diagnostic, spearman_rows
from delta_jax.eval.stats import accuracy_interval, bootstrap_interval, paired_difference, t_interval, wilson_interval
from delta_jax.eval.tasks import TASKS, Sample, make_samples, score_text

__all__ = [
    "FAMILIES", "TASKS", "Sample", "accuracy_interval", "authors_proportions", "bootstrap_interval", "cosine_rows",
    "depth_breakdown", "family_fidelity", "family_samples",
    "kl_divergence", "kl_fidelity", "make_samples", "paired_difference", "parse_method", "perplexity",
    "recall_samples", "run_eval", "run_fidelity", "run_shift", "run_sweep", "score_text", "shift_diagnostic",
    "spearman_rows", "sweep_methods", "t_interval", "wilson_interval",
]

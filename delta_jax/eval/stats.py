"""Confidence intervals: Wilson (binomial accuracies), Student t and percentile bootstrap (means), paired
differences."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054

# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def wilson_interval(successes: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `successes / trials`."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must lie in [0, trials={trials}]")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% Student t interval of the mean (zero width for a single value)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    m = float(x.mean())
    if x.size == 1:
        return m, m, m
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def bootstrap_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): 95% percentile bootstrap interval of the mean over `values` (seeded)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict:
    """Mean of `a - b` over paired samples with its 95% t interval (`ci_low`, `ci_high`) and percentile
    bootstrap interval (`boot_low`, `boot_high`)."""
    if np.ndim(a) != 1 or np.shape(a) != np.shape(b):
        raise ValueError(f"paired values need two flat sequences of one length, got shapes {np.shape(a)} and "
                         f"{np.shape(b)}")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    m, lo, hi = t_interval(d)
    _, blo, bhi = bootstrap_interval(d, seed=seed)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "boot_low": blo, "boot_high": bhi, "n": int(d.size)}


def accuracy_interval(hits: Sequence[int], totals: Sequence[int], *, seed: int = 0) -> dict:
    """Accuracy `sum(hits) / sum(totals)` with a 95% interval: Wilson when every sample has one expected
    value, else a bootstrap over samples of the per-sample fraction (the values of one sample are not
    independent trials)."""
    h = np.asarray(hits, np.float64)
    t = np.asarray(totals, np.float64)
    if h.size == 0 or h.shape != t.shape or (t < 1).any() or (h > t).any() or (h < 0).any():
        raise ValueError(f"need matching hits <= totals with totals >= 1, got hits={list(hits)}, "
                         f"totals={list(totals)}")
    acc = float(h.sum() / t.sum())
    if (t == 1).all():
        lo, hi = wilson_interval(float(h.sum()), int(t.sum()))
        how = "wilson"
    else:
        _, lo, hi = bootstrap_interval(h / t, seed=seed)
        how = "bootstrap"
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi, "ci_method": how,
            "hits": int(h.sum()), "total": int(t.sum()), "n": int(h.size)}

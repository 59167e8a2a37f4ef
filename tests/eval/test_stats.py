"""Confidence intervals against published values and simulation."""

import math

import numpy as np
import pytest

from delta_jax.eval.stats import accuracy_interval, bootstrap_interval, t975, t_interval, wilson_interval


@pytest.mark.parametrize("k,n,lo,hi", [
    (8, 10, 0.4902, 0.9433),    # Wilson (1927) / Newcombe (1998) 95% intervals
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), table I
])
def test_wilson_known_values(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=6e-4) and b == pytest.approx(hi, abs=6e-4)


def test_wilson_coverage():
    rng = np.random.default_rng(0)
    n, p = 40, 0.3
    ks = rng.binomial(n, p, 4000)
    cover = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in ks)])
    assert 0.93 <= cover <= 0.975


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(10) == pytest.approx(2.2281, abs=1e-4)
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError, match="df must be >= 1, got 0"):
        t975(0)


def test_t_interval_and_bootstrap():
    x = np.random.default_rng(3).normal(2.0, 1.5, 25)
    m, lo, hi = t_interval(x)
    half = 2.0639 * x.std(ddof=1) / math.sqrt(25)
    assert m == pytest.approx(x.mean())
    assert hi - m == pytest.approx(half, rel=1e-4) and m - lo == pytest.approx(half, rel=1e-4)
    bm, blo, bhi = bootstrap_interval(x, seed=1)
    assert bm == pytest.approx(m) and blo < m < bhi
    assert (bhi - blo) == pytest.approx(hi - lo, rel=0.25)  # close to the t interval for normal data
    assert bootstrap_interval(x, seed=1) == (bm, blo, bhi)


def test_accuracy_interval_picks_method():
    single = accuracy_interval([1, 0, 1, 1], [1, 1, 1, 1])
    assert single["ci_method"] == "wilson" and single["accuracy"] == 0.75
    assert (single["ci_low"], single["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    multi = accuracy_interval([3, 1, 2, 3], [3, 3, 3, 3])
    assert multi["ci_method"] == "bootstrap" and multi["accuracy"] == pytest.approx(9 / 12)
    assert multi["ci_low"] <= 0.75 <= multi["ci_high"] and (multi["hits"], multi["total"], multi["n"]) == (9, 12, 4)
    with pytest.raises(ValueError, match="hits"):
        accuracy_interval([2], [1])


def test_paired_difference():
    from delta_jax.eval.stats import paired_difference
    rng = np.random.default_rng(4)
    a = rng.normal(size=40)
    b = a - 0.3 + 0.05 * rng.normal(size=40)  # paired: the shared part cancels
    d = paired_difference(a, b, seed=2)
    m, lo, hi = t_interval(a - b)
    assert (d["mean"], d["ci_low"], d["ci_high"], d["n"]) == (m, lo, hi, 40)
    assert d["boot_low"] < 0.3 < d["boot_high"] and hi - lo < 0.05
    assert (d["boot_low"], d["boot_high"]) == bootstrap_interval(a - b, seed=2)[1:]
    with pytest.raises(ValueError, match=r"\(3,\) and \(1,\)"):
        paired_difference([1.0, 2.0, 3.0], [1.0])

"""Cosine / Spearman on hand-made arrays; the shift diagnostic through a fake engine."""

import json
import os

import numpy as np
import pytest

from delta_jax.config import PrefillConfig
from delta_jax.eval.shift import cosine_rows, run_shift, shift_diagnostic, spearman_rows


def test_cosine_hand_cases():
    a = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 4.0], [-1.0, 0.0], [4.0, 3.0], [0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [0.0, 1.0, -1.0, 24 / 25, 1.0, 0.0], atol=1e-15)
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    y = np.random.default_rng(1).normal(size=(3, 4, 5))
    ref = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    np.testing.assert_allclose(cosine_rows(x, y), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_rows(x, y[..., :4])


def test_spearman_hand_cases():
    x = np.random.default_rng(2).normal(size=(4, 16))
    np.testing.assert_allclose(spearman_rows(x, np.exp(x)), 1.0)
    np.testing.assert_allclose(spearman_rows(x, -x ** 3), -1.0)
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    assert spearman_rows(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 1 - 6 sum d^2 / (n (n^2 - 1))


def test_shift_diagnostic_fake(fake_engine):
    pre = PrefillConfig(method="window", window=60, sinks=4)
    methods = {"window": pre, "dense": PrefillConfig(method="dense")}
    res = shift_diagnostic(fake_engine, methods, length=300, samples=2, seed=0, spearman=True)
    w = res["methods"]["window"]
    assert w["rows_from"] == 64
    np.testing.assert_allclose(w["rows"][:, :64], 1.0, rtol=1e-6)  # rows that see all context are exact
    assert np.all(np.diff(w["mean_miss"]) < 0)  # the fake's noise grows with depth
    assert w["per_head_miss"].shape == (3, 2) and w["mean_all"].shape == (3,)
    assert np.all(w["mean_all"] > w["mean_miss"]) and np.all(w["p05_miss"] < w["mean_miss"])
    np.testing.assert_allclose(res["methods"]["dense"]["mean_all"], 1.0, rtol=1e-12)
    # the statistics are those of the arrays themselves
    from delta_jax.eval.fidelity import prose_tokens
    cos = []
    for t in prose_tokens(fake_engine.tokenizer, length=300, n=2, seed=0):
        d = fake_engine.attention_outputs(t, prefill=PrefillConfig())
        cos.append(cosine_rows(fake_engine.attention_outputs(t, prefill=pre), d)[:, 64:])
    np.testing.assert_allclose(w["mean_miss"], np.concatenate(cos, 1).mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(w["per_head_miss"], np.concatenate(cos, 1).mean(axis=1), rtol=1e-12)
    assert np.all(w["spearman_mean_miss"] < 1) and np.all(w["spearman_mean_all"] <= 1)


def test_run_shift_writes(fake_engine, tmp_path):
    methods = {"w60": PrefillConfig(method="window", window=60, sinks=4),
               "w120": PrefillConfig(method="window", window=120, sinks=4)}
    res = run_shift(fake_engine, methods=methods, lengths=[200, 300], samples=1, out_dir=str(tmp_path),
                    progress=False, rows_from=130)
    assert [r["length"] for r in res["results"]] == [200, 300]
    assert res["results"][0]["methods"]["w60"]["rows_from"] == 130
    for f in ("shift.json", "shift_200.png", "shift_300.png", "shift_rows_300.npz"):
        assert os.path.getsize(tmp_path / f) > 0
    saved = json.load(open(tmp_path / "shift.json"))
    assert len(saved["results"][1]["methods"]["w120"]["mean_miss"]) == 3

"""family_fidelity (KL over the exact recall tail, body NLL, paired differences) and the study's report."""

import copy

import numpy as np
import pytest

from delta_jax.config import ModelConfig, PrefillConfig
from delta_jax.eval.families import family_samples
from delta_jax.eval.fidelity import family_fidelity
from tests.eval.fakes import WordTokenizer, fake_logprobs

EXACT = 160
WINDOW, SINKS = 100, 10
METHODS = {"window": PrefillConfig(method="window", window=WINDOW, sinks=SINKS),
           "wide": PrefillConfig(method="window", window=4096, sinks=0)}


def _fake_cell(engine, **kw):
    return family_fidelity(engine, METHODS, family="qa", length=900, samples=3, seed=1, exact=EXACT,
                           batch_size=2, pairs=[("wide", "window"), ("window", "absent")], **kw)


def test_family_fidelity_fake(fake_engine):
    seen = []
    cell = _fake_cell(fake_engine, done=lambda c: seen.append(list(c["methods"])))
    assert seen == [["window"], ["window", "wide"]]
    # one dense pass over the samples serves both methods (batches of 2)
    assert [c[2] for c in fake_engine.calls] == ["dense"] * 2 + ["window"] * 4
    m, v = cell["methods"], fake_engine.vocab
    assert m["window"]["prefill"]["tail"] == EXACT and m["wide"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-12)
    texts = family_samples("qa", fake_engine.tokenizer, length=900, n=3, seed=1, tail_tokens=EXACT - 1)
    kl, nll = [], []
    for s in texts:
        # the fake window predicts uniformly past window + sinks: KL(p || uniform) = log V + sum p log p
        lp = fake_logprobs(s.tokens[-(s.tail + 1):], v)
        kl.append(np.mean(np.log(v) + (np.exp(lp) * lp).sum(-1)))
        body = len(s.tokens) - EXACT + 1
        full = fake_logprobs(s.tokens, v)
        first = body // 2
        nll.append(-np.mean([full[t - 1, s.tokens[t] % v] for t in range(first, body)]))
        assert first > WINDOW + SINKS
    assert m["window"]["per_sample_kl"] == pytest.approx(kl, rel=1e-5)
    assert m["window"]["nll"]["mean"] == pytest.approx(np.log(v), rel=1e-6)
    assert cell["dense"]["per_sample_nll"] == pytest.approx(nll, rel=1e-5)
    assert m["wide"]["per_sample_nll"] == pytest.approx(nll, rel=1e-12)
    d = cell["paired"]["wide - window"]
    assert set(cell["paired"]) == {"wide - window"}
    assert d["kl"]["mean"] == pytest.approx(-np.mean(kl), rel=1e-5) and d["kl"]["ci_high"] < 0
    assert d["nll"]["mean"] == pytest.approx(np.mean(nll) - np.log(v), rel=1e-5)
    assert d["kl"]["boot_low"] <= d["kl"]["mean"] <= d["kl"]["boot_high"]


def test_family_fidelity_skip_and_bad_input(fake_engine):
    cell = _fake_cell(fake_engine, skip=lambda name: name == "wide")
    assert list(cell["methods"]) == ["window"] and cell["paired"] == {}
    with pytest.raises(ValueError, match="exact=900 "):
        family_fidelity(fake_engine, METHODS, family="kv", length=900, samples=1, exact=900)
    with pytest.raises(ValueError, match="'poetry'"):
        family_fidelity(fake_engine, METHODS, family="poetry", length=900, samples=1)


def test_family_fidelity_real_engine():
    engine_mod = pytest.importorskip("delta_jax.engine")
    cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=512, tie_embeddings=True)
    engine = engine_mod.Engine.from_config(cfg, dtype="float32", tokenizer=WordTokenizer(), max_seq_len=512,
                                           progress=False)
    methods = {"wide": PrefillConfig(method="window", window=512, sinks=0),  # sees everything: dense
               "narrow": PrefillConfig(method="delta", window=32, sinks=4, gamma=16)}
    cell = family_fidelity(engine, methods, family="kv", length=400, samples=2, exact=EXACT, batch_size=2,
                           pairs=[("narrow", "wide")])
    wide, narrow = cell["methods"]["wide"], cell["methods"]["narrow"]
    assert wide["kl"]["mean"] < 1e-5 and narrow["kl"]["mean"] > 1e-4
    np.testing.assert_allclose(wide["per_sample_nll"], cell["dense"]["per_sample_nll"], rtol=1e-5)
    assert abs(narrow["nll"]["mean"] - cell["dense"]["nll"]["mean"]) > 1e-4
    assert cell["paired"]["narrow - wide"]["kl"]["mean"] == pytest.approx(narrow["kl"]["mean"] - wide["kl"]["mean"])


def test_study_report(fake_engine, tmp_path):
    study = pytest.importorskip("benchmarks.correction_study")
    methods = {"delta_taylor": PrefillConfig(method="window", window=4096, sinks=0),
               "delta_shrink": PrefillConfig(method="window", window=WINDOW, sinks=SINKS)}
    cells = {f: family_fidelity(fake_engine, methods, family=f, length=900, samples=3, exact=EXACT,
                                pairs=study.PAIRS) for f in ("prose", "kv")}
    config = {"window": 256, "sinks": 16, "gamma": 64, "exact": EXACT, "start_fraction": 0.5, "samples": 3,
              "seed": 0, "dtype": "float32", "methods": {k: {} for k in methods}}
    full = {"env": {}, "config": config, "cells": {"900": cells}}
    md = study.families_tables(full)
    d = cells["kv"]["paired"]["delta_taylor - delta_shrink"]["kl"]
    kv = cells["kv"]["methods"]
    shrink, taylor = (f"{kv[m]['kl']['mean']:.4f} ± {(kv[m]['kl']['ci_high'] - kv[m]['kl']['ci_low']) / 2:.4f}"
                      for m in ("delta_shrink", "delta_taylor"))
    top1 = f"{100 * cells['kv']['dense']['value_top1']:.0f}%"
    assert f"| kv | 3 | {top1} | {shrink} | {taylor} | " in md  # the README order: shrink before taylor
    assert f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" in md
    assert "| all families (pooled) | 6 |" in md and "**body NLL, 900 tokens**" in md
    # two runs holding one method each merge into the full result (paired differences recomputed)
    halves = []
    for keep in methods:
        run = copy.deepcopy(full)
        run["config"]["methods"] = {keep: {}}
        for c in run["cells"]["900"].values():
            c["methods"] = {keep: c["methods"][keep]}
            c["paired"] = {}
        halves.append(run)
    merged = study.merge_families(halves)
    assert merged["cells"]["900"]["kv"]["paired"] == cells["kv"]["paired"]
    other = copy.deepcopy(halves[1])
    other["config"]["seed"] = 1
    with pytest.raises(ValueError, match="seed"):
        study.merge_families([halves[0], other])
    rows = [{"method": m, "task": t, "length": n, "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1}
            for m, acc in (("dense", 0.5), ("taylor_cal", 0.4)) for t in ("niah_multivalue_list", "niah_multivalue")
            for n in (4000, 8000)]
    table = study.pipeline_table(rows)
    assert "| pipeline | list 4000 | list 8000 | multi-value 4000 | multi-value 8000 | mean 4000 | mean 8000 |" in table
    assert "| `taylor` prefill + DELTA decode, calibrated layers | 40.0 ± 10.0 |" in table
    study.families_plot(merged, str(tmp_path / "families.png"))
    assert (tmp_path / "families.png").stat().st_size > 1000

"""KL divergence against closed forms; KL fidelity and perplexity through a fake engine."""

import numpy as np
import pytest

from delta_jax.config import PrefillConfig
from delta_jax.eval.fidelity import kl_divergence, kl_fidelity, perplexity, prose_tokens, recall_samples
from tests.eval.fakes import fake_logprobs


def test_kl_closed_forms():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7))
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(kl_divergence(lp, lp), 0.0, atol=1e-15)
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert kl_divergence(np.log(p), np.log(q)) == pytest.approx(expected, rel=1e-12)
    # p with a zero: KL(p || uniform) = log V - H(p)
    p = np.array([0.2, 0.0, 0.8])
    with np.errstate(divide="ignore"):
        got = kl_divergence(np.log(p), np.log(np.full(3, 1 / 3)))
    assert got == pytest.approx(np.log(3) + 0.2 * np.log(0.2) + 0.8 * np.log(0.8), rel=1e-12)
    # q = 0 where p > 0 -> inf
    with np.errstate(divide="ignore"):
        assert np.isinf(kl_divergence(np.log(np.array([0.5, 0.5])), np.log(np.array([1.0, 0.0]))))
    # asymmetric; positive for random pairs
    z2 = rng.normal(size=(5, 7))
    lq = z2 - np.log(np.exp(z2).sum(-1, keepdims=True))
    assert (kl_divergence(lp, lq) > 0).all() and not np.allclose(kl_divergence(lp, lq), kl_divergence(lq, lp))
    with pytest.raises(ValueError, match="shape"):
        kl_divergence(lp, lq[:, :3])


def test_recall_samples(word_tokenizer):
    samples = recall_samples(word_tokenizer, length=600, n=2, seed=1, pairs=5)
    for s in samples:
        assert len(s.tokens) <= 600 and len(s.tokens) >= 590
        tail_text = word_tokenizer.decode(s.tokens[-s.tail:])
        assert tail_text.startswith("\n\nThe same records again:")
        for k, v in s.records:
            assert f"{k}: {v}" in tail_text
            assert f"{k}: {v}" in word_tokenizer.decode(s.tokens[:40])  # listed early too
        assert sorted(word_tokenizer.decode([s.tokens[p]]).strip() for p in s.value_positions) == \
            sorted(v for _, v in s.records)


def test_kl_fidelity_fake(fake_engine):
    w, sinks = 100, 10
    methods = {"dense": PrefillConfig(method="dense"),
               "window": PrefillConfig(method="window", window=w, sinks=sinks),
               "wide": PrefillConfig(method="window", window=4096, sinks=0)}
    res = kl_fidelity(fake_engine, methods, length=500, samples=3, seed=0, pairs=4, batch_size=2)
    m = res["methods"]
    assert m["dense"]["kl"]["mean"] == 0.0 and m["wide"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["dense"]["top1_agree"] == 1.0
    # the fake window is uniform on the tail: KL(p || uniform) = log V + sum p log p, per position
    texts = recall_samples(fake_engine.tokenizer, length=500, n=3, seed=0, pairs=4)
    expected = []
    for s in texts:
        lp = fake_logprobs(s.tokens[-(s.tail + 1):], fake_engine.vocab)
        expected.append(np.mean(np.log(fake_engine.vocab) + (np.exp(lp) * lp).sum(-1)))
    assert m["window"]["kl"]["mean"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert m["window"]["per_sample_kl"] == pytest.approx(expected, rel=1e-9)
    assert m["window"]["kl"]["ci_low"] < m["window"]["kl"]["mean"] < m["window"]["kl"]["ci_high"]
    assert m["dense"]["value_top1"] == res["dense_value_top1"]


def test_perplexity_fake(fake_engine):
    methods = {"window": PrefillConfig(method="window", window=40, sinks=10)}
    res = perplexity(fake_engine, methods, length=400, samples=2, seed=0, start_fraction=0.5)
    # every counted position is past window + sinks: the fake window predicts uniformly
    assert res["methods"]["window"]["perplexity"]["mean"] == pytest.approx(fake_engine.vocab, rel=1e-9)
    texts = prose_tokens(fake_engine.tokenizer, length=400, n=2, seed=0)
    nll = []
    for t in texts:
        lp = fake_logprobs(t, fake_engine.vocab)
        nll.append(-np.mean([lp[i - 1, t[i] % fake_engine.vocab] for i in range(200, 400)]))
    assert res["methods"]["dense"]["nll"]["mean"] == pytest.approx(np.mean(nll), rel=1e-6)
    diff = res["methods"]["window"]["nll_minus_dense"]["mean"]
    assert diff == pytest.approx(np.log(fake_engine.vocab) - np.mean(nll), rel=1e-6)
    with pytest.raises(ValueError, match="start_fraction=1.5"):
        perplexity(fake_engine, methods, length=400, start_fraction=1.5)


def test_one_pass_over_recall_and_prose_matches_the_separate_measures(fake_engine):
    from delta_jax.eval import fidelity
    window = PrefillConfig(method="window", window=40, sinks=10)
    recall = recall_samples(fake_engine.tokenizer, length=500, n=3, seed=0, pairs=4)
    prose = prose_tokens(fake_engine.tokenizer, length=500, n=2, seed=0)
    ref_r, ref_p = fidelity.score_sets(fake_engine, PrefillConfig(), recall, prose, batch_size=2)
    res_r, res_p = fidelity.score_sets(fake_engine, window, recall, prose, batch_size=4)
    kl = fidelity.kl_summary(window, fidelity.kl_stats(ref_r, res_r, recall))
    sep = kl_fidelity(fake_engine, {"w": window}, length=500, texts=recall)["methods"]["w"]
    assert kl["per_sample_kl"] == pytest.approx(sep["per_sample_kl"], rel=1e-12) and kl["kl"]["mean"] > 0.1
    nll = fidelity.nll_summary(window, fidelity.nll_stats(res_p, prose), fidelity.nll_stats(ref_p, prose))
    ppl = perplexity(fake_engine, {"w": window}, length=500, texts=prose)["methods"]["w"]
    assert nll["nll"]["mean"] == pytest.approx(ppl["nll"]["mean"], rel=1e-12)
    assert nll["nll_minus_dense"]["mean"] == pytest.approx(ppl["nll_minus_dense"]["mean"], rel=1e-12)

"""The evaluation functions on the real Engine with a tiny random-weight model (properties, not accuracy)."""

import numpy as np
import pytest

from delta_jax.config import ModelConfig, PrefillConfig
from tests.eval.fakes import WordTokenizer

engine_mod = pytest.importorskip("delta_jax.engine")

W, S = 48, 8


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=512, tie_embeddings=True)
    return engine_mod.Engine.from_config(cfg, dtype="float32", tokenizer=WordTokenizer(), max_seq_len=512)


METHODS = {"dense": PrefillConfig(method="dense"),
           "window": PrefillConfig(method="window", window=W, sinks=S, gamma=32, tail=32),
           "wide": PrefillConfig(method="delta", window=512, sinks=S, gamma=32, tail=32)}


def test_run_eval_real_engine(tiny, tmp_path):
    from delta_jax.eval.runner import run_eval
    res = run_eval(tiny, tasks=["niah_single"], lengths=[256], methods=METHODS, samples=2, progress=False,
                   max_new_tokens=3, out_dir=str(tmp_path))
    outs = {r["method"]: [s["output"] for s in r["samples"]] for r in res["results"]}
    assert outs["wide"] == outs["dense"]  # a window covering the prompt reproduces dense generation
    assert all(len(r["samples"]) == 2 and 0 <= r["accuracy"] <= 1 for r in res["results"])
    assert res["meta"]["model"]["num_layers"] == 2


@pytest.mark.slow
def test_fidelity_and_shift_real_engine(tiny):
    from delta_jax.eval.fidelity import kl_fidelity
    from delta_jax.eval.shift import shift_diagnostic
    kl = kl_fidelity(tiny, METHODS, length=256, samples=2, pairs=3)["methods"]
    assert kl["dense"]["kl"]["mean"] == 0.0
    assert abs(kl["wide"]["kl"]["mean"]) < 1e-5
    assert kl["window"]["kl"]["mean"] > 1e-4
    sh = shift_diagnostic(tiny, METHODS, length=256, samples=1)["methods"]
    # rows before window + sinks see their whole context: exact in every layer (causality)
    np.testing.assert_allclose(sh["window"]["rows"][:, :W + S], 1.0, atol=1e-5)
    assert np.all(sh["window"]["mean_miss"] < 0.999)
    np.testing.assert_allclose(sh["wide"]["mean_all"], 1.0, atol=1e-5)

"""run_eval end to end with the fake engine; method parsing and sweeps; bad arguments."""

import json
import os

import numpy as np
import pytest

from delta_jax.config import DecodeConfig, PrefillConfig
from delta_jax.eval.methods import authors_proportions, parse_method, sweep_methods
from delta_jax.eval.runner import run_eval, run_sweep
from delta_jax.eval.stats import wilson_interval
from delta_jax.eval.tasks import make_samples
from tests.eval.fakes import visible


def test_run_eval_fake(fake_engine, tmp_path):
    window = PrefillConfig(method="window", window=120, sinks=8)
    methods = {"dense": (PrefillConfig(method="dense"), DecodeConfig()), "window": window}
    res = run_eval(fake_engine, tasks=["niah_single", "niah_multivalue"], lengths=[400, 800], methods=methods,
                   samples=6, seed=3, out_dir=str(tmp_path), progress=False, batch_size=4)
    rows = {(r["method"], r["task"], r["length"]): r for r in res["results"]}
    assert len(rows) == 8
    for task in ("niah_single", "niah_multivalue"):
        for n in (400, 800):
            dense = rows["dense", task, n]
            assert dense["accuracy"] == 1.0
            # the fake window finds exactly the needles inside its sinks + window
            samples = make_samples(task, fake_engine.tokenizer, length=n, n=6, seed=3)
            hits = 0
            for s in samples:
                seen = fake_engine.tokenizer.decode(visible(s.tokens, window))
                hits += sum(f"is: {a}." in seen for a in s.answers)
            total = sum(len(s.answers) for s in samples)
            assert rows["window", task, n]["hits"] == hits and rows["window", task, n]["total"] == total
    assert rows["window", "niah_single", 800]["accuracy"] < 1.0
    single = rows["dense", "niah_single", 400]
    assert (single["ci_low"], single["ci_high"]) == pytest.approx(wilson_interval(6, 6))
    assert rows["dense", "niah_multivalue", 400]["ci_method"] == "bootstrap"
    assert [c for c in fake_engine.calls if c[0] == "generate"][0][1] == 4  # batched
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["results"][0]["samples"][0]["output"]
    assert saved["methods"]["window"]["400"]["prefill"]["window"] == 120
    assert os.path.getsize(tmp_path / "accuracy.png") > 1000
    table = open(tmp_path / "results.md").read()
    assert "| dense | niah_single | 100.0 ± " in table and "| window | *mean* |" in table


def test_length_dependent_methods_and_sweep(fake_engine):
    grid = sweep_methods(windows=(64, 128), sinks=(8,), gammas=(16, 64), authors=True)
    assert set(grid) == {"dense", "window w64 s8 g16", "window w64 s8 g64", "window w128 s8 g16",
                         "window w128 s8 g64", "delta w64 s8 g16", "delta w64 s8 g64", "delta w128 s8 g16",
                         "delta w128 s8 g64", "window 3/4 g16", "window 3/4 g64", "delta 3/4 g16", "delta 3/4 g64"}
    assert authors_proportions(4096) == (2048, 1024)
    sparse = sweep_methods(windows=(64,), sinks=(4,), gammas=(16,), kinds=("window",), recompute=False, dense=False)
    (pre, _), = sparse.values()
    assert pre.gamma is None and pre.tail == 0 and list(sparse) == ["window w64 s4"]
    res = run_sweep(fake_engine, tasks=["niah_single"], lengths=[300, 600], windows=(64,), sinks=(4,), gammas=(16,),
                    kinds=("window",), samples=2, progress=False)
    assert res["methods"]["window 3/4 g16"]["600"]["prefill"]["window"] == 300
    assert res["methods"]["window 3/4 g16"]["600"]["prefill"]["sinks"] == 150
    acc = {(r["method"], r["length"]): r["accuracy"] for r in res["results"]}
    assert acc["dense", 600] == 1.0
    assert np.isfinite(list(acc.values())).all()


def test_parse_method():
    name, (pre, dec) = parse_method("d256=delta:window=256,sinks=16,gamma=32,smooth=true")
    assert name == "d256" and pre == PrefillConfig(method="delta", window=256, sinks=16, gamma=32, smooth=True)
    assert dec == DecodeConfig()
    name, (pre, dec) = parse_method("mix=dense/delta:budget=32,selection_layers=2.15.23,full_layers=0.1")
    assert dec.selection_layers == (2, 15, 23) and dec.full_layers == (0, 1) and dec.budget == 32
    assert parse_method("window:window=64,gamma=none")[1][0].gamma is None
    with pytest.raises(ValueError, match="windw"):
        parse_method("x=window:windw=3")
    with pytest.raises(ValueError, match="sparse"):
        parse_method("x=sparse")


def test_bad_arguments(fake_engine):
    m = {"dense": PrefillConfig()}
    with pytest.raises(ValueError, match="niah_nope"):
        run_eval(fake_engine, tasks=["niah_nope"], lengths=[300], methods=m, samples=1, progress=False)
    fake_engine.max_seq_len = 320
    with pytest.raises(ValueError, match="max_seq_len=320"):
        run_eval(fake_engine, tasks=["niah_single"], lengths=[300], methods=m, samples=1, progress=False)
    fake_engine.max_seq_len = 10000
    with pytest.raises(ValueError, match="method 'bad'"):
        run_eval(fake_engine, tasks=["niah_single"], lengths=[300], methods={"bad": "dense"}, samples=1,
                 progress=False)
    with pytest.raises(ValueError, match="samples=0"):
        run_eval(fake_engine, tasks=["niah_single"], lengths=[300], methods=m, samples=0, progress=False)
    bad_sched = (PrefillConfig(), DecodeConfig(method="delta", full_layers=(0,), selection_layers=(2,)))
    with pytest.raises(ValueError, match="layer 1 would be sparse"):
        run_eval(fake_engine, tasks=["niah_single"], lengths=[300], methods={"d": bad_sched}, samples=1,
                 progress=False)


def test_cli_entry_points(fake_engine, tmp_path, capsys):
    import argparse

    from delta_jax.eval import cli
    p = argparse.ArgumentParser()
    cli.add_eval_args(p)
    a = p.parse_args(["--tasks", "niah_single", "--lengths", "300", "--samples", "2", "--out", str(tmp_path),
                      "--method", "dense=dense", "--method", "w=window:window=64,sinks=4", "--fidelity",
                      "--no-progress"])
    out = cli.run_eval_cli(a, fake_engine)
    printed = capsys.readouterr().out
    assert "| dense | niah_single | 100.0 ± " in printed and "KL" in printed
    assert set(out["tasks"]["methods"]) == {"dense", "w"}
    assert os.path.isfile(tmp_path / "fidelity.json") and os.path.isfile(tmp_path / "results.json")
    s = argparse.ArgumentParser()
    cli.add_shift_args(s)
    a = s.parse_args(["--lengths", "200", "--sweep", "--windows", "32,64", "--gammas", "16", "--out",
                      str(tmp_path / "shift"), "--no-progress"])
    res = cli.run_shift_cli(a, fake_engine)
    assert set(res["results"][0]["methods"]) == {"window w32 s16 g16", "window w64 s16 g16",
                                                 "delta w32 s16 g16", "delta w64 s16 g16"}
    assert os.path.isfile(tmp_path / "shift" / "shift_200.png")


def test_depth_breakdown(fake_engine):
    from delta_jax.eval.runner import depth_breakdown
    window = PrefillConfig(method="window", window=350, sinks=4)  # the last 35% of 1000 tokens
    res = run_eval(fake_engine, tasks=["niah_single"], lengths=[1000], methods={"w": window}, samples=8,
                   progress=False)
    rows = depth_breakdown(res, bins=4)
    assert [r["n"] for r in rows] == [2, 2, 2, 2]  # stratified depths: two samples per quarter
    assert rows[0]["accuracy"] == 0.0 and rows[-1]["accuracy"] == 1.0  # only late needles are in the window
    with pytest.raises(ValueError, match="bins must be >= 1, got 0"):
        depth_breakdown(res, bins=0)

"""benchmarks/serving.py: throughputs compared only between runs that served the same requests, and the decode's
bandwidth bound."""

import numpy as np

from benchmarks.serving import Workload, decode_bound, floors, ratios


def _run(tps, served, failed):
    return {"output_tokens_per_second": tps, "requests": served, "failed": failed}


def test_a_run_that_refused_requests_gives_no_ratio():
    given, withheld = ratios({"static": _run(90.0, 12, 0), "dense": _run(180.0, 8, 4), "delta": _run(270.0, 12, 0)})
    assert given == {"output tokens/s, delta / static": 3.0}
    assert withheld == ["no dense / static ratio: dense refused 4 of 12 requests",
                        "no delta / dense ratio: dense refused 4 of 12 requests"]


def test_runs_that_served_everything_give_every_ratio():
    given, withheld = ratios({"static": _run(50.0, 12, 0), "dense": _run(100.0, 12, 0), "delta": _run(150.0, 12, 0)})
    assert given == {"output tokens/s, dense / static": 2.0, "output tokens/s, delta / static": 3.0,
                     "output tokens/s, delta / dense": 1.5}
    assert withheld == []


def test_the_decode_bound_counts_every_token_s_context_and_the_longest_answer_s_steps():
    rng = np.random.default_rng(7)
    prompts = [list(range(int(n))) for n in rng.integers(1, 50, 5)]
    outputs = rng.integers(1, 20, 5)
    w = Workload(np.zeros(5), prompts, outputs)
    per_token, weights, bandwidth = 96, 1000, 1e6
    kv = sum(per_token * (len(p) + j) for p, o in zip(prompts, outputs) for j in range(o))
    b = decode_bound(w, per_token, weights, bandwidth)
    assert (b["kv_bytes"], b["steps"]) == (kv, outputs.max())
    assert b["seconds"] == (kv + weights * outputs.max()) / bandwidth


def test_a_dense_run_s_floor_is_its_prefills_plus_the_decode_bound():
    runs = {"static@4": {"seconds": 90.0, "failed": 0}, "static@2": {"seconds": 120.0, "failed": 1},
            "dense@8": {"seconds": 50.0, "prefill_seconds": 15.0}, "delta@8": {"seconds": 30.0, "prefill_seconds": 5.0}}
    assert floors(runs, {"seconds": 30.0}) == [
        "dense@8: prefills 15.0s + decode bound 30.0s = at least 45.0s, ran 50.0s; static@4 / that 2.00x at most"]

"""benchmarks/serving.py compares throughputs only between runs that served the same requests."""

from benchmarks.serving import ratios


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

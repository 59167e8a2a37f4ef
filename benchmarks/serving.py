"""Serving under Poisson arrivals: continuous batching through `delta-jax serve`'s HTTP app vs static batches.

One process, one random-weight model, the SAME arrivals for every run:
- `dense`, `delta`: the app of `delta-jax serve` (uvicorn on a thread) over a Scheduler with the dense or the
  Delta Attention + DELTA methods; each request is a streamed `/v1/completions` call with token ids, sent by an
  asyncio httpx client at its arrival time (as vLLM's benchmark_serving sends them);
- `static`: dense, requests grouped in arrival order into batches of `--static-batch`; a batch starts when the
  previous one is done and all its requests have arrived, and runs `Engine.generate` (every row decodes to the
  batch's longest output; a request is complete when its own `max_tokens` have streamed).
Prompt lengths are drawn from `--lengths` (each prompt exactly one of them, so the prefill compiles once per
length), output lengths uniformly from `--outputs`. Every compile is warmed up before timing. Reports time to
first token (p50/p99), time per output token, request and token throughput, the peak KV pages in use, and how
many long requests a paged pool holds against a padded cache of the same bytes, the least time dense decode
of the requests takes at the read bandwidth measured in the run, and each continuous run's prompts' prefill time
(one prompt at a time on the idle device, measured after its warm-up). JSON + plot + table.

    python benchmarks/serving.py --out benchmarks/results            # H200: random-weight Llama-3.1-8B, bf16
    python benchmarks/serving.py --smoke                              # tiny model on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from delta_jax import cache, memory, server  # noqa: E402
from delta_jax.config import ConfigError, DecodeConfig, PrefillConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402
from delta_jax.scheduler import Request  # noqa: E402

MODEL = "random-weights"


@dataclasses.dataclass
class Workload:
    """Request i arrives at `arrival[i]` seconds with `prompts[i]` (token ids) and asks for `outputs[i]` tokens."""

    arrival: np.ndarray
    prompts: list
    outputs: np.ndarray


@dataclasses.dataclass
class Timing:
    """Client-side times of one request (seconds from the run's start)."""

    arrival: float
    tokens: list  # arrival time of each output token
    end: float
    error: str = ""  # why the server ended the request without finishing it (refused: no tokens)


def workload(n: int, rate: float, duration, lengths, outputs, vocab: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    if duration is not None:
        arrival = arrival[arrival < duration]
    n = len(arrival)
    lens = rng.choice(lengths, n)
    prompts = [rng.integers(0, vocab, int(k)).tolist() for k in lens]
    return Workload(arrival, prompts, rng.integers(outputs[0], outputs[1] + 1, n))


def summarize(w: Workload, timings: list, seconds: float) -> dict:
    """TTFT, time per output token (after the first), end-to-end latency and throughput of one run (latencies
    over the requests that were served; the others are counted and their first error kept)."""
    failed = [t for t in timings if t.error]
    timings = [t for t in timings if not t.error]
    ttft = np.array([t.tokens[0] - t.arrival for t in timings])
    tpot = np.array([(t.tokens[-1] - t.tokens[0]) / (len(t.tokens) - 1) for t in timings if len(t.tokens) > 1])
    e2e = np.array([t.end - t.arrival for t in timings])
    out_tokens = sum(len(t.tokens) for t in timings)
    prompt_tokens = sum(len(p) for p in w.prompts)
    q = lambda x, p: float(np.percentile(x, p)) if len(x) else None  # noqa: E731
    return {"requests": len(timings), "failed": len(failed), "first_error": failed[0].error if failed else None,
            "seconds": seconds, "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99),
            "ttft_mean": float(ttft.mean()) if len(ttft) else None,
            "tpot_p50": q(tpot, 50), "tpot_p99": q(tpot, 99), "tpot_mean": float(tpot.mean()) if len(tpot) else None,
            "e2e_p50": q(e2e, 50), "e2e_p99": q(e2e, 99),
            "requests_per_second": len(timings) / seconds, "output_tokens_per_second": out_tokens / seconds,
            "total_tokens_per_second": (out_tokens + prompt_tokens) / seconds, "output_tokens": out_tokens}


def parse_run(name: str) -> tuple[str, Optional[int]]:
    """A run's name -> (`static`, `dense` or `delta`; N of its `@N`: slots, or the rows of a static batch, None
    without; -1 for `static@max`). Raises ValueError naming a bad one."""
    kind, at, n = name.partition("@")
    if kind == "static" and n == "max":
        return kind, -1
    if kind not in ("static", "dense", "delta") or (at and not (n.isdigit() and int(n) > 0)):
        raise ValueError(f"--runs: {name!r} is not static, dense or delta with an optional @N (N >= 1), "
                         f"or static@max")
    return kind, int(n) if at else None


def ratios(runs: dict) -> tuple[dict, list]:
    """Output-token throughput of each continuous run (dense, delta) against each static run, and of delta against
    dense at the same slots, between runs that served every request (a ratio compares the same requests), and one
    line for each pair withheld."""
    runs = {k: r for k, r in runs.items() if "output_tokens_per_second" in r}
    kind = {k: parse_run(k)[0] for k in runs}
    pairs = [(k, base) for k in runs for base in runs
             if (kind[k] != "static" and kind[base] == "static")
             or (kind[k] == "delta" and kind[base] == "dense" and runs[k].get("slots") == runs[base].get("slots"))]
    tps = {k: r["output_tokens_per_second"] for k, r in runs.items()}
    given = {f"output tokens/s, {k} / {base}": tps[k] / tps[base]
             for k, base in pairs if not runs[k]["failed"] and not runs[base]["failed"]}
    withheld = [f"no {k} / {base} ratio: " + ", ".join(f"{n} refused {runs[n]['failed']} of "
                                                        f"{runs[n]['failed'] + runs[n]['requests']} requests"
                                                        for n in (k, base) if runs[n]["failed"])
                for k, base in pairs if runs[k]["failed"] or runs[base]["failed"]]
    return given, withheld


# ---------------------------------------------------------------------------------------------- continuous batching
async def _client(url: str, w: Workload, sched, poll: dict) -> tuple[list, float]:
    import httpx

    start = time.perf_counter()
    now = lambda: time.perf_counter() - start  # noqa: E731

    async def one(client, i):
        await asyncio.sleep(max(0.0, w.arrival[i] - now()))
        tokens = []
        body = {"model": MODEL, "prompt": w.prompts[i], "max_tokens": int(w.outputs[i]), "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # refused or failed after the stream began
                    return Timing(float(w.arrival[i]), tokens, now(), chunk["error"]["message"])
                if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                    tokens.append(now())
                if chunk.get("usage") and chunk["usage"]["completion_tokens"] != len(tokens):
                    raise RuntimeError(f"request {i}: {len(tokens)} chunks for {chunk['usage']} tokens")
        return Timing(float(w.arrival[i]), tokens, now())

    async def watch():
        while True:
            m = sched.metrics()
            poll["max_running"] = max(poll["max_running"], m["running"])
            poll["max_waiting"] = max(poll["max_waiting"], m["waiting"])
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        watcher = asyncio.ensure_future(watch())
        timings = await asyncio.gather(*(one(client, i) for i in range(len(w.prompts))))
        watcher.cancel()
    return list(timings), now()


def time_prefills(sched, lengths, vocab: int) -> dict:
    """Seconds of one prompt's prefill (compiled, on the idle device, to its first token) for each of `lengths`."""
    rng = np.random.default_rng(2)
    out = {}
    for n in lengths:
        sched.submit(Request(prompt=rng.integers(0, vocab, n).tolist(), max_tokens=1))
        t0 = time.perf_counter()
        sched.run()
        out[n] = time.perf_counter() - t0
    return out


def run_server(engine, w: Workload, prefill: PrefillConfig, decode: DecodeConfig, a) -> dict:
    """Continuous batching through the HTTP app: warm-up of every prompt length, then the timed arrivals."""
    sched = engine.scheduler(prefill, decode, slots=a.slots, num_pages=a.kv_pages, chunk=a.chunk)
    sched.max_prefill_tokens = 1  # one prompt per prefill: long prompts fill the device alone, one compile per length
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    for n in sorted({len(p) for p in w.prompts}):
        sched.submit(Request(prompt=rng.integers(0, engine.config.vocab_size, n).tolist(), max_tokens=a.chunk + 1))
    sched.run()
    warm = time.perf_counter() - t0
    print(f"  warm-up (compiles) {warm:.1f}s", flush=True)
    by_length = time_prefills(sched, sorted({len(p) for p in w.prompts}), engine.config.vocab_size)
    sched.reset_metrics()
    sock = server.listen("127.0.0.1", 0)
    srv = server.server(server.create_app(engine, sched, model_name=MODEL, warmup=False), sock)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    poll = {"max_running": 0, "max_waiting": 0}
    try:
        timings, seconds = asyncio.run(_client("http://127.0.0.1:%d" % sock.getsockname()[1], w, sched, poll))
    finally:
        srv.should_exit = True
        thread.join()
        sched.close()  # its pool must not hold the memory the next run needs
    m = sched.metrics()
    spec = sched.spec
    out = summarize(w, timings, seconds)
    out.update(warmup_seconds=warm, prefill_seconds_by_length=by_length,
               prefill_seconds=sum(by_length[len(p)] for p in w.prompts), peak_pages=m["peak_pages_in_use"],
               pool_pages=m["pages_total"],
               page_size=spec.page_size, slots=spec.slots, pages_per_slot=spec.pages_per_seq, **poll,
               server_ttft_p50=m["ttft_p50_seconds"], server_ttft_p99=m["ttft_p99_seconds"],
               padded_pages_for_max_running=poll["max_running"] * spec.pages_per_seq)
    out["timings"] = [dataclasses.asdict(t) for t in timings]
    return out


# ---------------------------------------------------------------------------------------------- static batches
class _Warm(Exception):
    """Raised from a warm-up batch's first decoded token: every shape of the batch has been compiled."""


def _stop_when_decoding():
    """An `on_token` for `Engine.generate` that raises `_Warm` at a row's second token (the prefills are done
    and one decode chunk has run)."""
    seen = set()

    def on_token(j, token):
        if j in seen:
            raise _Warm
        seen.add(j)
    return on_token


def run_static(engine, w: Workload, a, warm: bool) -> dict:
    """Static batches of `--static-batch` in arrival order through `Engine.generate` (see the module doc);
    with `warm`, runs each batch untimed first until its first decode chunk (each batch compiles its own
    shapes: the prefills and the decode loop for the batch's pool)."""
    n, b = len(w.prompts), a.static_batch
    batches = [list(range(k, min(n, k + b))) for k in range(0, n, b)]
    t0 = time.perf_counter()
    if warm:
        for idx in batches:
            try:
                engine.generate([w.prompts[i] for i in idx], max_new_tokens=int(max(w.outputs[idx])), chunk=a.chunk,
                                on_token=_stop_when_decoding())
            except _Warm:
                pass
            except ConfigError as e:
                print(f"  warm-up batch refused: {e}", flush=True)
    warm_s = time.perf_counter() - t0
    print(f"  warm-up (compiles: each batch up to its first decode chunk) {warm_s:.1f}s", flush=True)
    timings: list = [None] * n
    start = time.perf_counter()
    now = lambda: time.perf_counter() - start  # noqa: E731
    for idx in batches:
        time.sleep(max(0.0, w.arrival[idx[-1]] - now()))
        got = [[] for _ in idx]

        def on_token(j, token, got=got, idx=idx):
            if len(got[j]) < w.outputs[idx[j]]:
                got[j].append(now())

        try:
            engine.generate([w.prompts[i] for i in idx], max_new_tokens=int(max(w.outputs[idx])), chunk=a.chunk,
                            on_token=on_token)
            error = ""
        except ConfigError as e:  # refused (memory): the batch's requests count as failed
            error = str(e)
        for j, i in enumerate(idx):
            timings[i] = Timing(float(w.arrival[i]), got[j], got[j][-1] if got[j] else now(), error)
    out = summarize(w, timings, now())
    out.update(warmup_seconds=warm_s, batches=len(batches), static_batch=b)
    out["timings"] = [dataclasses.asdict(t) for t in timings]
    return out


# ---------------------------------------------------------------------------------------------- bounds
def decode_bound(w: Workload, kv_bytes_per_token: int, weight_bytes: int, bandwidth: float) -> dict:
    """The least time dense decode of the workload takes at `bandwidth` (bytes/s): each output token reads its
    row's context from the KV cache (the prompt and the tokens before it), and each step reads the weights, for
    at least as many steps as the longest answer."""
    kv = sum(kv_bytes_per_token * (len(p) * int(o) + int(o) * (int(o) - 1) // 2) for p, o in zip(w.prompts, w.outputs))
    steps = int(max(w.outputs))
    return {"bandwidth": bandwidth, "kv_bytes": kv, "weight_bytes": weight_bytes, "steps": steps,
            "seconds": (kv + weight_bytes * steps) / bandwidth}


def floors(runs: dict, bound: dict) -> list[str]:
    """For each continuous dense run: its prompts' prefills (one at a time on the idle device) plus the decode
    bound, the least time any dense schedule of these requests takes with this prefill; and the most a dense run
    could gain on each static run that served every request (the same tokens over that least time)."""
    lines = []
    for k, r in runs.items():
        if parse_run(k)[0] != "dense" or "prefill_seconds" not in r:
            continue
        least = r["prefill_seconds"] + bound["seconds"]
        gains = [f"{base} / that {s['seconds'] / least:.2f}x at most" for base, s in runs.items()
                 if parse_run(base)[0] == "static" and "seconds" in s and not s["failed"]]
        lines.append(f"{k}: prefills {r['prefill_seconds']:.1f}s + decode bound {bound['seconds']:.1f}s = at least "
                     f"{least:.1f}s, ran {r['seconds']:.1f}s" + "".join(f"; {g}" for g in gains))
    return lines


# ---------------------------------------------------------------------------------------------- capacity
def capacity(engine, a, methods, slots: int, long_len: int, new_tokens: int) -> dict:
    """Requests of `long_len + new_tokens` tokens held at once in the memory of the KV pool that a continuous run
    with `methods` and `slots` gets (what the free memory holds beside XLA's figure for its longest prefills): in
    pages (pages per request) against padded rows (one of `row` tokens per request), for each padded length."""
    sched = engine.scheduler(*methods, slots=slots, num_pages=a.kv_pages, chunk=a.chunk)
    pages = sched.metrics()["pages_total"]
    sched.close()
    tokens = pages * a.page_size
    return {"bytes": tokens * memory.kv_bytes_per_token(engine.config, engine.dtype), "pool_pages": pages,
            "request_tokens": long_len + new_tokens, "paged": pages // cache.pages_for(long_len + new_tokens,
                                                                                      a.page_size),
            "padded_by_row_tokens": {str(r): tokens // r for r in (engine.max_seq_len, a.padded_len)}}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results["runs"].items() if "timings" in v}
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in runs.items():
        ttft = np.sort([t["tokens"][0] - t["arrival"] for t in r["timings"] if t["tokens"]])
        ax[0].step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=name)
    ax[0].set(xlabel="time to first token (s)", ylabel="share of requests", title="TTFT CDF")
    ax[0].legend()
    names = list(runs)
    ax[1].bar(names, [1e3 * (runs[k]["tpot_p50"] or 0) for k in names])
    ax[1].set(ylabel="ms", title="time per output token (p50)")
    ax[2].bar(names, [runs[k]["output_tokens_per_second"] for k in names])
    ax[2].set(ylabel="tokens/s", title="output token throughput")
    fig.suptitle(f"{results['env']['device']}: {results['workload']['requests']} requests, "
                 f"rate {results['args']['rate']}/s, prompts {results['args']['lengths']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    head = (f"{'run':<10} {'seconds':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
            f"{'req/s':>7} {'out tok/s':>10} {'peak pages':>11} {'max running':>12}")
    lines = [head]
    for name, r in results["runs"].items():
        if "timings" not in r:
            lines.append(f"{name:<10} {r.get('skipped') or r.get('error')}")
            continue
        ms = lambda x: f"{1e3 * x:.1f}ms" if x is not None else "-"  # noqa: E731
        if r["failed"]:
            lines.append(f"{name:<10} {r['failed']} request(s) failed, the first: {r['first_error']}")
        if not r["requests"]:
            continue
        lines.append(f"{name:<10} {r['seconds']:>7.1f}s {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s "
                     f"{ms(r['tpot_p50']):>9} {ms(r['tpot_p99']):>9} {r['requests_per_second']:>7.2f} "
                     f"{r['output_tokens_per_second']:>10.1f} {r.get('peak_pages', '-'):>11} "
                     f"{r.get('max_running', '-'):>12}")
    for k, v in results.get("ratios", {}).items():
        lines.append(f"{k}: {v:.2f}x")
    lines += results.get("ratios_withheld", [])
    b = results.get("decode_bound")
    if b:
        lines.append(f"dense decode of these requests at the measured read bandwidth ({b['bandwidth'] / 1e12:.2f} "
                     f"TB/s): at least {b['seconds']:.1f}s (KV {b['kv_bytes'] / 1e12:.1f} TB, weights "
                     f"{b['weight_bytes'] / 1e9:.1f} GB x {b['steps']} steps); the rest of a run's seconds is prefill, "
                     f"waits and the decode above the bound")
        lines += floors(results["runs"], b)
    c = results["capacity"]
    lines.append(f"{c['request_tokens']}-token requests held in the continuous runs' pool ({c['pool_pages']} pages, "
                 f"{c['bytes'] / 2**30:.1f} GiB): paged {c['paged']}, "
                 + ", ".join(f"padded to {k} tokens {v}" for k, v in c["padded_by_row_tokens"].items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768", help="prompt lengths, drawn uniformly")
    ap.add_argument("--outputs", default="64,256", help="output lengths: lo,hi (uniform)")
    ap.add_argument("--rate", type=float, default=4.0,
                    help="Poisson arrival rate, requests/s (the default saturates one H200 with the default mix, "
                         "so throughput measures capacity, not the arrival rate)")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--duration", type=float, default=None, help="keep only requests arriving in the first N s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="dense,static,delta",
                    help="from dense, delta (continuous batching), static; NAME@N runs it with N slots (N rows a "
                         "static batch) instead of --slots (--static-batch); static@max: the most rows padded to "
                         "the longest request that the continuous runs' pool holds (the capacity line)")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--kv-pages", type=int, default=None, help="pool pages (default: every slot at full length)")
    ap.add_argument("--chunk", type=int, default=16, help="decode steps per dispatch")
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--no-static-warmup", action="store_true", help="time static batches with their compiles")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=64)
    ap.add_argument("--full-layers", default="0,1")
    ap.add_argument("--selection-layers", default="2,16,25")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--recent", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--padded-len", type=int, default=131072,
                    help="padded row length compared with (default: Llama-3.1's context)")
    ap.add_argument("--deadline", type=float, default=330.0, help="start no run after this many seconds")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="serving")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workload on the CPU")
    a = ap.parse_args(argv)
    try:
        runs = [(name, *parse_run(name)) for name in a.runs.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if a.smoke:
        a.lengths, a.outputs, a.rate, a.num_requests = "64,200", "3,8", 8.0, 6
        a.slots, a.chunk, a.static_batch = 4, 4, 3
        a.window, a.sinks, a.gamma, a.full_layers, a.selection_layers, a.budget, a.recent = 32, 4, 16, "0", "1,3", 4, 2
        a.padded_len, a.name = 1024, a.name + "_smoke"
    t_start = time.perf_counter()
    lengths = [int(x) for x in a.lengths.split(",")]
    outputs = [int(x) for x in a.outputs.split(",")]
    cfg = dataclasses.replace(common.tiny(), head_dim=64) if a.smoke else common.llama31_8b()  # delta: head_dim 64+
    engine = Engine.from_config(cfg, dtype="auto", max_seq_len=max(lengths) + outputs[1], progress=True)
    print(f"model built in {time.perf_counter() - t_start:.1f}s", flush=True)
    w = workload(a.num_requests, a.rate, a.duration, lengths, outputs, cfg.vocab_size, a.seed)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    dense = (PrefillConfig(method="dense"), DecodeConfig(method="dense", page_size=a.page_size))
    delta = (PrefillConfig(method="delta", window=a.window, sinks=a.sinks, gamma=a.gamma),
             DecodeConfig(method="delta", full_layers=ints(a.full_layers), selection_layers=ints(a.selection_layers),
                          budget=a.budget, recent=a.recent, page_size=a.page_size))
    slots = max([n or a.slots for _, kind, n in runs if kind != "static"], default=a.slots)  # the widest pool
    results = {"env": common.environment(), "args": vars(a), "config": dataclasses.asdict(cfg),
               "methods": {"dense": [dataclasses.asdict(m) for m in dense],
                           "delta": [dataclasses.asdict(m) for m in delta]},
               "workload": {"requests": len(w.prompts), "arrival": w.arrival.tolist(),
                            "prompt_tokens": [len(p) for p in w.prompts], "output_tokens": w.outputs.tolist()},
               "capacity": capacity(engine, a, dense, slots, max(lengths), outputs[1]), "runs": {}}
    bandwidth = common.hbm_bandwidth(0.0625 if a.smoke else 4.0, read_only=True)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.state))
    results["decode_bound"] = decode_bound(w, memory.kv_bytes_per_token(cfg, engine.dtype), weights, bandwidth)
    print(f"{len(w.prompts)} requests over {w.arrival[-1]:.1f}s", flush=True)
    most = min(len(w.prompts), results["capacity"]["padded_by_row_tokens"][str(engine.max_seq_len)])
    runs = [(f"static@{most}", kind, most) if n == -1 else (name, kind, n) for name, kind, n in runs]
    for name, kind, n in runs:
        elapsed = time.perf_counter() - t_start
        if elapsed > a.deadline:
            results["runs"][name] = {"skipped": f"deadline: {elapsed:.0f}s > {a.deadline:.0f}s"}
            continue
        print(f"run {name}", flush=True)
        t0 = time.perf_counter()
        if kind == "static":
            r = run_static(engine, w, argparse.Namespace(**{**vars(a), "static_batch": n or a.static_batch}),
                           warm=not a.no_static_warmup)
        else:
            r = run_server(engine, w, *(dense if kind == "dense" else delta),
                           argparse.Namespace(**{**vars(a), "slots": n or a.slots}))
        gc.collect()  # the run's KV pool goes before the next run allocates its own
        r["wall_seconds"] = time.perf_counter() - t0
        print(f"  run {name} done in {r['wall_seconds']:.1f}s", flush=True)
        results["runs"][name] = r
        common.write_json(results, a.out, f"{a.name}.json")
    results["total_seconds"] = time.perf_counter() - t_start
    results["ratios"], results["ratios_withheld"] = ratios(results["runs"])
    path = common.write_json(results, a.out, f"{a.name}.json")
    plot(results, os.path.join(a.out, f"{a.name}.png"))
    print(table(results))
    print(f"wrote {path} in {results['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()

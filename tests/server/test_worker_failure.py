"""A scheduler step that raises: every live request gets a server error, /health turns 503, new requests 503."""

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from delta_jax import server  # noqa: E402
from delta_jax.config import ModelConfig  # noqa: E402
from delta_jax.engine import Engine  # noqa: E402

CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256)


def test_a_failed_step_fails_its_requests_and_the_server_says_so(monkeypatch):
    engine = Engine.from_config(CFG, dtype="float32")
    sched = engine.scheduler(slots=2, chunk=2)
    entered, release = threading.Event(), threading.Event()

    def broken_step():
        entered.set()
        release.wait(30)  # hold the step until both requests are waiting on it
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(sched, "step", broken_step)
    sock = server.listen("127.0.0.1", 0)
    srv = server.server(server.create_app(engine, sched, model_name="tiny", warmup=False), sock)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        assert httpx.get(url + "/health").status_code == 200
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4}
        results = {}
        plain = threading.Thread(target=lambda: results.update(plain=httpx.post(url + "/v1/completions", json=body,
                                                                                timeout=60)))
        plain.start()
        assert entered.wait(30)
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            time.sleep(0.5)  # the streamed request is queued behind the held step
            release.set()
            lines = [x for x in r.iter_lines() if x]
        plain.join(60)
        r = results["plain"]
        assert r.status_code == 500
        assert r.json()["error"] == {"message": "RuntimeError: device lost", "type": "server_error", "param": None,
                                     "code": None}
        assert lines[-1] == "data: [DONE]" and '"RuntimeError: device lost"' in lines[-2]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        again = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 503 and "stopped after an error" in again.json()["error"]["message"]
    finally:
        release.set()
        srv.should_exit = True
        thread.join(60)

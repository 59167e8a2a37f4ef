"""The built-in SmolLM2-135M (from its GGUF) against Hugging Face transformers on the same weights."""

import os

import numpy as np
import pytest
import torch
import transformers

from delta_jax.engine import Engine

TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. "
        "Over the centuries, merchants arrived from distant lands, bringing spices, cloth and new ideas. "
        "The village grew into a town, and the town into a city with markets, libraries and a harbour "
        "that could hold a hundred ships. Scholars came to study in its libraries, and artists painted "
        "the light on the water at dawn. ")


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    engine = Engine.from_pretrained("smollm2-135m", dtype="float32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()
    return engine, hf


def test_top1_over_256_tokens_matches_transformers(models):
    engine, hf = models
    ids = engine.tokenizer(TEXT * 4)["input_ids"][:256]
    assert len(ids) == 256
    ours = engine.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.max(np.abs(ours - ref)) < 2e-3


def test_greedy_generation_matches_transformers(models):
    engine, hf = models
    ids = engine.encode("What is the capital of France?", chat=True)
    ours = engine.generate([ids], max_new_tokens=16)[0].tokens
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    n = min(len(ours), len(ref))
    assert ours[:n] == ref[:n] and n >= 7
    assert "Paris" in engine.tokenizer.decode(ours)


def test_score_matches_transformers_logprobs(models):
    engine, hf = models
    ids = engine.tokenizer(TEXT * 2)["input_ids"][:160]
    out = engine.score([ids], last=4)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    expected = ref[np.arange(len(ids) - 1), ids[1:]]
    assert out.logprobs.shape == (len(ids) - 1,)
    assert np.max(np.abs(out.logprobs - expected)) < 2e-3
    assert np.max(np.abs(out.last_logprobs - ref[-4:])) < 2e-3

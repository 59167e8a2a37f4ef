import os

import pytest

from tests.eval.fakes import FakeEngine, WordTokenizer

SMOL_DIR = os.path.join(os.path.expanduser(os.environ.get("DELTA_JAX_CACHE") or "~/.cache/delta-jax"),
                        "smollm2-135m")


@pytest.fixture
def fake_engine():
    return FakeEngine()


@pytest.fixture(scope="session")
def word_tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer of the converted built-in model, when it is in the cache."""
    if not os.path.isfile(os.path.join(SMOL_DIR, "tokenizer.json")):
        pytest.skip("the converted smollm2-135m (with its tokenizer) is not in the cache")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR)

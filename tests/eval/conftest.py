import pytest

from tests.eval.fakes import FakeEngine, WordTokenizer


@pytest.fixture
def fake_engine():
    return FakeEngine()


@pytest.fixture(scope="session")
def word_tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_folder):
    """The SmolLM2 tokenizer of the converted built-in model."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_folder)

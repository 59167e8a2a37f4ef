"""Incremental detokenization: the streamed pieces join to the whole output's decoding, at a cost per token that
does not grow with the output."""

import numpy as np
import pytest

from delta_jax.scheduler import Detokenizer
from tests.checkpoints.test_gguf_tokenizer import random_texts


class Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)


def _stream(tokenizer, ids):
    d = Detokenizer(tokenizer)
    pieces = [d(ids[:n]) for n in range(1, len(ids) + 1)]
    return pieces + [d(ids, final=True)]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2, Mistral): a word's leading space is part of its token, and the
    decoder drops the one that begins the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(random_texts(200, seed=5), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]
                                                                           + bytes_))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "metaspace_tokenizer"])
def test_the_pieces_join_to_the_whole_decoding(which, request):
    tok = request.getfixturevalue(which)
    for text in random_texts(20, seed=3) + ["Hello world, naïve café 東京都 🦊 👩‍💻 e\u0301"]:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        # no piece ends inside a character: an emoji split over byte tokens arrives whole
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_a_token_costs_the_same_at_any_length(smollm2_tokenizer):
    rng = np.random.default_rng(0)
    ids = smollm2_tokenizer.encode(" ".join(random_texts(400, seed=int(rng.integers(1 << 30)))),
                                   add_special_tokens=False)
    assert len(ids) > 3000
    counting = Counting(smollm2_tokenizer)
    pieces = _stream(counting, ids)
    assert "".join(pieces) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded < 16 * len(ids)  # decoding the whole output per token: len(ids)**2 / 2

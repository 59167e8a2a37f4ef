"""A word-level tokenizer and a fake engine whose sparse methods see only the sinks and the window."""

from __future__ import annotations

import dataclasses
import re
import types
import zlib

import numpy as np

from delta_jax.config import PrefillConfig

_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")


class WordTokenizer:
    """Pieces = a word or a punctuation mark with its leading spaces; decode is exact."""

    eos_token_id = None

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.vocab[piece]

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [self._id(p) for p in _PIECE.findall(text)]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] if i < len(self.pieces) else f" <{i}>" for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return body + ("<assistant>\n" if add_generation_prompt else "")


@dataclasses.dataclass
class Out:
    text: str
    tokens: list
    prefill_seconds: float = 0.01


@dataclasses.dataclass
class Scored:
    tokens: list
    logprobs: np.ndarray
    last_logprobs: np.ndarray


def visible(tokens, prefill: PrefillConfig):
    """Token ids a fake `window` sees; `dense` and `delta` see everything."""
    if prefill.method != "window" or len(tokens) <= prefill.window + prefill.sinks:
        return list(tokens)
    return list(tokens[:prefill.sinks]) + list(tokens[-prefill.window:])


def fake_logprobs(tokens, vocab: int = 11) -> np.ndarray:
    """`[T, vocab]` log-softmax depending on each position's token (the fake dense model)."""
    z = np.stack([np.random.default_rng(int(t)).normal(size=vocab) * 2 for t in tokens])
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class FakeEngine:
    """`generate` answers the question from the needles it can see; `score` and `attention_outputs`
    degrade the rows t >= window + sinks for `window` (uniform next-token distribution; noisy outputs)."""

    vocab = 11

    def __init__(self, max_seq_len: int = 100000, layers: int = 3, heads: int = 2, head_dim: int = 8):
        self.tokenizer = WordTokenizer()
        self.max_seq_len = max_seq_len
        self.config = types.SimpleNamespace(num_layers=layers, num_heads=heads, head_dim=head_dim)
        self.calls = []

    def generate(self, prompts, *, max_new_tokens=32, chat=False, temperature=0.0, seed=0,
                 prefill=PrefillConfig(), decode=None):
        self.calls.append(("generate", len(prompts), prefill.method))
        outs = []
        for toks in prompts:
            full = self.tokenizer.decode(toks)
            seen = self.tokenizer.decode(visible(toks, prefill))
            asked = re.findall(r"for (\S+) in the text above", full)[-1]
            found = re.findall(rf"special magic \w+s for {re.escape(asked)} is: (\S+)\.", seen)
            text = " " + ", ".join(found) if found else " I do not know"
            ids = self.tokenizer(text)["input_ids"][:max_new_tokens]
            outs.append(Out(self.tokenizer.decode(ids), ids))
        return outs

    def _lp(self, toks, prefill):
        lp = fake_logprobs(toks, self.vocab)
        if prefill.method == "window":
            lp[prefill.window + prefill.sinks:] = -np.log(self.vocab)
        return lp

    def score(self, prompts, *, prefill=PrefillConfig(), last=0):
        self.calls.append(("score", len(prompts), prefill.method))
        out = []
        for toks in prompts:
            lp = self._lp(toks, prefill)
            tok = np.asarray(toks[1:]) % self.vocab
            out.append(Scored(list(toks), lp[np.arange(len(toks) - 1), tok], lp[len(toks) - last:] if last else None))
        return out

    def attention_outputs(self, tokens, *, prefill=PrefillConfig()):
        self.calls.append(("trace", 1, prefill.method))
        rng = np.random.default_rng(zlib.crc32(np.asarray(tokens, np.int64).tobytes()))
        c = self.config
        out = rng.normal(size=(c.num_layers, len(tokens), c.num_heads, c.head_dim)).astype(np.float32)
        if prefill.method == "window":
            noise = np.random.default_rng(1).normal(size=out.shape).astype(np.float32)
            start = prefill.window + prefill.sinks
            for layer in range(c.num_layers):
                out[layer, start:] += 0.5 * (layer + 1) * noise[layer, start:]
        return out

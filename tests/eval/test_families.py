"""Text families: lengths, determinism, the recall tail refers to early content only, real tokenization."""

import re

import pytest

from delta_jax.eval.families import FAMILIES, TAIL_TOKENS, family_samples


def _check_recall(decode, s, length):
    """Length, tail and values: every recalled value is in the tail and the head, and nowhere else in the body."""
    assert 0.97 * length <= len(s.tokens) <= length
    assert len(s.records) >= 2 and s.tail <= TAIL_TOKENS
    start = len(s.tokens) - s.tail
    assert all(start <= p < len(s.tokens) for p in s.value_positions)
    body, head, tail = decode(s.tokens[:start]), decode(s.tokens[:s.head]), decode(s.tokens[start:])
    assert s.head < 0.3 * len(s.tokens)
    for cue, value in s.records:
        for part in value.split(", "):
            assert part in tail and part in head and part not in body[len(head):]
    # each run of value tokens decodes to one recalled value, in tail order
    runs, pos = [], s.value_positions
    for i, p in enumerate(pos):
        if i == 0 or p != pos[i - 1] + 1:
            runs.append([])
        runs[-1].append(s.tokens[p])
    assert [decode(r).strip() for r in runs] == [part for _, v in s.records for part in v.split(", ")]
    return body, head


@pytest.mark.parametrize("family", FAMILIES)
def test_family_word_tokenizer(word_tokenizer, family):
    length = 2000
    samples = family_samples(family, word_tokenizer, length=length, n=3, seed=2)
    for s in samples:
        body, head = _check_recall(word_tokenizer.decode, s, length)
        filler = body[len(head):]
        if family != "kv":  # the registry's later lines hold other values; no other filler has digits
            assert not re.search(r"\d", filler)
    again = family_samples(family, word_tokenizer, length=length, n=3, seed=2)
    assert [s.tokens for s in again] == [s.tokens for s in samples]
    other = family_samples(family, word_tokenizer, length=length, n=3, seed=3)
    assert all(a.tokens != b.tokens for a, b in zip(other, samples))
    assert len({tuple(s.tokens) for s in samples}) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_family_smollm2_tokenizer(smol_tokenizer, family):
    length = 2048
    for s in family_samples(family, smol_tokenizer, length=length, n=2, seed=0):
        _check_recall(smol_tokenizer.decode, s, length)
        if family != "records":  # records cut their filler mid-word; the others join whole units
            assert smol_tokenizer(smol_tokenizer.decode(s.tokens))["input_ids"] == s.tokens


def test_family_contents(word_tokenizer):
    code = family_samples("code", word_tokenizer, length=1500, n=1, seed=0)[0]
    text = word_tokenizer.decode(code.tokens)
    assert "\ndef self_check():" in text
    for cue, value in code.records:  # settings asserted with their values; helpers called by keyword
        if cue.endswith("=="):
            assert f"{cue[:-3]} = {value}" in text and f"assert {cue} {value}" in text
        else:
            params = value.split(", ")
            assert f"def {cue}{params[0]}, {params[1]}, {params[2]}=None)" in text
            assert f"{cue}{params[0]}=[], {params[1]}=" in text
    qa = family_samples("qa", word_tokenizer, length=1500, n=1, seed=0)[0]
    text = word_tokenizer.decode(qa.tokens)
    for question, answer in qa.records:
        assert f"Question: {question}\nAnswer:" in text and re.search(rf"Answer:( Its)? {answer}\.", text)
    prose = family_samples("prose", word_tokenizer, length=1500, n=1, seed=0)[0]
    text = word_tokenizer.decode(prose.tokens)
    quoted = " ".join(f"{a} {b}" for a, b in prose.records)
    assert text.endswith("once more:\n" + quoted) and text.count(quoted) == 2


def test_family_bad_input(word_tokenizer):
    with pytest.raises(ValueError, match="'novel'"):
        family_samples("novel", word_tokenizer, length=1000, n=1)
    with pytest.raises(ValueError, match="length=100 "):
        family_samples("qa", word_tokenizer, length=100, n=1)
    with pytest.raises(ValueError, match="tail_tokens=10 "):
        family_samples("kv", word_tokenizer, length=1000, n=1, tail_tokens=10)
    with pytest.raises(ValueError, match="tail_tokens=20 "):
        family_samples("records", word_tokenizer, length=1000, n=1, tail_tokens=20)

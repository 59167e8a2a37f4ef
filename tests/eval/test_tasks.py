"""Task generators: token lengths, answers in the prompt, depths, determinism, scoring."""

import re

import pytest

from delta_jax.eval.tasks import TASKS, make_samples, score_text


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("chat", [False, True])
def test_length_and_answers_word_tokenizer(word_tokenizer, task, chat):
    length = 1500
    samples = make_samples(task, word_tokenizer, length=length, n=3, seed=5, chat=chat)
    for s in samples:
        assert 0.95 * length <= len(s.tokens) <= length
        assert word_tokenizer(s.text)["input_ids"] == s.tokens
        for a in s.answers:
            assert a in s.text
        if chat:
            assert s.text.startswith("<user>\n") and "<assistant>\n" in s.text


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey_2", "niah_multikey_3", "niah_multivalue_list",
                                  "variable_tracking"])
@pytest.mark.parametrize("length", [1024, 4000])
def test_length_smollm2_tokenizer(smol_tokenizer, task, length):
    for chat in (False, True):
        for s in make_samples(task, smol_tokenizer, length=length, n=2, seed=1, chat=chat):
            assert 0.95 * length <= len(s.tokens) <= length, (task, chat, len(s.tokens))
            assert smol_tokenizer.decode(s.tokens).count(s.answers[0]) >= 1


def test_needles_hold_the_answers(word_tokenizer):
    s = make_samples("niah_single", word_tokenizer, length=800, n=1, seed=3)[0]
    key = s.metadata["keys"][0]
    assert re.fullmatch(r"\d{7}", s.answers[0])
    assert f"One of the special magic numbers for {key} is: {s.answers[0]}." in s.text
    assert s.text.rstrip().endswith(f"The special magic number for {key} in the text above is:")

    mk2 = make_samples("niah_multikey_2", word_tokenizer, length=1200, n=1, seed=3)[0]
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", mk2.text)
    assert len(needles) > 20  # the haystack is distractor needles
    keys = [k for k, _ in needles]
    assert len(set(keys)) == len(keys)
    assert mk2.text.count(mk2.answers[0]) == 1  # the value appears once: only the asked needle

    mk3 = make_samples("niah_multikey_3", word_tokenizer, length=1200, n=1, seed=3)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, mk3.answers[0]) and re.fullmatch(uuid, mk3.metadata["keys"][0])

    mv = make_samples("niah_multivalue", word_tokenizer, length=1200, n=1, seed=3)[0]
    key = mv.metadata["keys"][0]
    assert re.findall(rf"numbers for {key} is: (\d+)\.", mv.text) == mv.answers and len(mv.answers) == 4

    lst = make_samples("niah_multivalue_list", word_tokenizer, length=1200, n=1, seed=3)[0]
    key = lst.metadata["keys"][0]
    assert re.findall(rf"numbers for {key} is: (\d+)\.", lst.text) == lst.answers  # in order of appearance
    assert "List the three" in lst.text and lst.max_new_tokens >= 24


def test_variable_tracking_chain(word_tokenizer):
    s = make_samples("variable_tracking", word_tokenizer, length=1000, n=1, seed=2, num_chains=3, num_hops=3)[0]
    names, value = s.answers, s.metadata["value"]
    assert len(names) == 4
    assert f"VAR {names[0]} = {value}." in s.text
    for a, b in zip(names, names[1:]):
        assert s.text.index(f"VAR {b} = VAR {a}.") > s.text.index(f"VAR {a} =")
    assert len(re.findall(r"VAR \w+ = \d+\.", s.text)) == 3  # three chains, three values


def test_depths_stratified_and_placed(word_tokenizer):
    n = 8
    samples = make_samples("niah_single", word_tokenizer, length=2000, n=n, seed=0)
    for i, s in enumerate(samples):
        d = s.metadata["depths"][0]
        assert i / n <= d < (i + 1) / n
        start = s.text.index("\n\n") + 2
        end = s.text.rindex("\n\nWhat is")
        pos = (s.text.index("One of the special magic") - start) / (end - start)
        assert abs(pos - d) < 0.05
    narrow = make_samples("niah_multivalue", word_tokenizer, length=2000, n=4, seed=0, depth_range=(0.2, 0.5))
    for s in narrow:
        assert all(0.2 <= d < 0.5 for d in s.metadata["depths"])


def test_deterministic(word_tokenizer):
    a = make_samples("niah_multikey_1", word_tokenizer, length=900, n=3, seed=7)
    b = make_samples("niah_multikey_1", word_tokenizer, length=900, n=3, seed=7)
    c = make_samples("niah_multikey_1", word_tokenizer, length=900, n=3, seed=8)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.answers for s in a] == [s.answers for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert len({s.answers[0] for s in a}) == 3  # samples differ from each other


def test_score_text():
    assert score_text("The number is 1234567.", ["1234567"]) == 1.0
    assert score_text("the number is 123456", ["1234567"]) == 0.0
    assert score_text("7654321 and 1111111", ["1111111", "2222222", "7654321", "3333333"]) == 0.5
    assert score_text("ABCDE, FGHIJ", ["abcde", "fghij", "klmno"]) == pytest.approx(2 / 3)
    assert score_text("only fghij", ["abcde", "fghij"], "any") == 1.0
    assert score_text("none here", ["abcde", "fghij"], "any") == 0.0


def test_bad_arguments(word_tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah_none'"):
        make_samples("niah_none", word_tokenizer, length=500, n=1)
    with pytest.raises(ValueError, match="length=20"):
        make_samples("niah_single", word_tokenizer, length=20, n=1)
    with pytest.raises(ValueError, match="num_chains"):
        make_samples("niah_single", word_tokenizer, length=500, n=1, num_chains=2)
    with pytest.raises(ValueError, match="depth_range"):
        make_samples("niah_single", word_tokenizer, length=500, n=1, depth_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="metric 'some'"):
        score_text("x", ["x"], "some")

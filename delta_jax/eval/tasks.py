"""Offline RULER-style long-context tasks, sized in tokens with the model's tokenizer, and their scoring.

Tasks (`TASKS`):
- `niah_single`: one needle "One of the special magic numbers for {key} is: {7-digit number}." in filler;
- `niah_multikey_1`: four needles with different word keys in prose, one asked;
- `niah_multikey_2`: the whole haystack is distractor needles (word keys, numbers), one asked;
- `niah_multikey_3`: the whole haystack is distractor needles with UUID keys and UUID values;
- `niah_multivalue`: four values of one key, all must be recalled;
- `niah_multiquery`: four keys asked at once, all values must be recalled;
- `variable_tracking`: chains `VAR A = 12345 ... VAR B = VAR A ...` in noise; name every variable bound to the value;
- `niah_multivalue_list`: three values of one key listed in one answer (24+ tokens; for decode studies).

`make_samples(task, tokenizer, length=..., n=..., seed=...)` gives `Sample`s whose `tokens` (the prompt as
fed to the model, chat-formatted when `chat=True`, ending in the answer prefix) number at most `length` and
within 5% of it (short pad sentences close the context where filler units are coarse). Needle depths are
stratified over `depth_range`, so `n` samples cover it evenly.
`score_text(pred, answers, metric)`: RULER's string matching: "all" is the fraction of expected values
contained in the prediction (case-insensitive), "any" is 1 if any is.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from typing import Any, Callable, Sequence

from delta_jax.eval.corpus import NOISE, filler_stream

_ADJECTIVES = (
    "amber", "bold", "brave", "bright", "calm", "clever", "cosmic", "crimson", "curly", "daring", "dusty",
    "eager", "early", "electric", "emerald", "fancy", "fierce", "floral", "frosty", "gentle", "giant",
    "golden", "grumpy", "happy", "hidden", "hollow", "humble", "icy", "jolly", "keen", "lively", "lonely",
    "lucky", "lunar", "mellow", "misty", "modern", "noble", "odd", "olive", "polar", "proud", "quick",
    "quiet", "rapid", "rustic", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "solar",
    "spicy", "steady", "stormy", "sunny", "swift", "tender", "tiny", "velvet", "vivid", "wild", "witty",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "barrel", "beacon", "bison", "blossom", "bridge",
    "candle", "canyon", "castle", "cedar", "comet", "compass", "coral", "cricket", "dolphin", "dragon",
    "falcon", "feather", "fjord", "forest", "fountain", "garden", "glacier", "harbor", "hazel", "helmet",
    "island", "jaguar", "kettle", "lantern", "lemon", "lily", "magnet", "maple", "meadow", "mirror",
    "nebula", "otter", "panther", "pebble", "pepper", "piano", "pigeon", "planet", "pumpkin", "quartz",
    "rabbit", "raven", "ribbon", "saddle", "salmon", "signal", "spider", "teapot", "thunder", "tiger",
    "tulip", "violin", "walrus", "willow",
)

_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_NUMBER = "number"
_UUID = "uuid"


@dataclasses.dataclass
class Sample:
    """One prompt: `tokens` (fed to the model), `text` (their text), the expected `answers` and `metric`."""

    task: str
    index: int
    length: int
    tokens: list[int]
    text: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    metadata: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """JSON-friendly summary (no token ids)."""
        return {"task": self.task, "index": self.index, "length": self.length,
                "prompt_tokens": len(self.tokens), "answers": list(self.answers), "metric": self.metric,
                **self.metadata}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A prompt before sizing: `render(n, pad)` gives (instruction+context+question, answer prefix) with `n`
    filler units and `pad` short noise sentences closing the context (fine length adjustment)."""

    render: Callable[[int, int], tuple[str, str]]
    answers: list[str]
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------- scoring

def score_text(pred: str, answers: Sequence[str], metric: str = "all") -> float:
    """RULER string match: `all` = fraction of answers contained in `pred`; `any` = 1.0 if one is."""
    if metric not in ("all", "any"):
        raise ValueError(f"unknown metric {metric!r}; choose all or any")
    if not answers:
        raise ValueError("answers is empty: nothing to score against")
    p = pred.lower()
    hits = [a.lower() in p for a in answers]
    return sum(hits) / len(hits) if metric == "all" else float(any(hits))


def hits_of(pred: str, answers: Sequence[str]) -> int:
    """Number of expected answers contained in `pred` (case-insensitive)."""
    p = pred.lower()
    return sum(a.lower() in p for a in answers)


# ---------------------------------------------------------------------------- tokenizer helpers

def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def format_prompt(tokenizer, body: str, answer_prefix: str, chat: bool) -> tuple[str, list[int]]:
    """The text fed to the model and its token ids: chat template around `body` then the answer prefix."""
    if chat:
        head = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
        text = head + answer_prefix
        return text, encode(tokenizer, text, add_special_tokens=False)
    text = body + "\n" + answer_prefix
    return text, encode(tokenizer, text, add_special_tokens=True)


def _pad(k: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(k)]


def _fit(layout: _Layout, tokenizer, length: int, chat: bool, max_units: int) -> tuple[str, list[int], int]:
    """Largest filler count whose prompt has at most `length` tokens (secant steps, then bisection),
    then as many short pad sentences as still fit (units such as UUID needles are coarse)."""
    cache: dict[tuple[int, int], tuple[str, list[int]]] = {}

    def size(n: int, pad: int = 0) -> int:
        if (n, pad) not in cache:
            cache[n, pad] = format_prompt(tokenizer, *layout.render(n, pad), chat)
        return len(cache[n, pad][1])

    base = size(0)
    if base > length:
        raise ValueError(f"length={length} tokens is too short for this task: its prompt without filler "
                         f"already has {base} tokens")
    probe = min(8, max_units)
    per_unit = max(1.0, (size(probe) - base) / probe)
    lo, hi = 0, max_units + 1  # size(lo) <= length; hi: the smallest count known to exceed it
    guess = int((length - base) / per_unit)
    for step in range(64):
        if hi - lo <= 1:
            break
        if step >= 8 or not lo < guess < hi:
            guess = (lo + hi) // 2
        s = size(guess)
        if s <= length:
            lo, guess = guess, guess + max(1, round((length - s) / per_unit))
        else:
            hi, guess = guess, guess - max(1, round((s - length) / per_unit))
    if lo >= max_units:
        raise ValueError(f"length={length}: the filler ran out at {max_units} units")
    pad = 0
    while pad < 64 and size(lo, pad) < 0.99 * length and size(lo, pad + 1) <= length:
        pad += 1
    text, ids = cache[lo, pad]
    if len(ids) < 0.95 * length:
        raise ValueError(f"length={length}: could only reach {len(ids)} tokens")
    return text, ids, lo


def _depths(rng: random.Random, k: int, depth_range: tuple[float, float], stratum: tuple[int, int]):
    """`k` increasing depths in `depth_range`: needle j lies in the j-th of k equal segments, and within it
    in the i-th of n equal parts for `stratum=(i, n)` (stratified over the n samples of a task)."""
    a, b = depth_range
    i, n = stratum
    return [a + (b - a) * (j + (i + rng.random()) / n) / k for j in range(k)]


def _insert(units: list[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Inserts each (depth, sentence) at fraction `depth` of `units` (between sentences, order kept)."""
    out = list(units)
    for depth, s in sorted(needles, key=lambda x: x[0], reverse=True):
        out.insert(round(depth * len(units)), s)
    return out


# ---------------------------------------------------------------------------- value and key makers

def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_keys(rng: random.Random, n: int) -> list[str]:
    """`n` distinct keys like `quiet-harbor` (three words once the two-word space is exhausted)."""
    pairs = len(_ADJECTIVES) * len(_NOUNS)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n:
        if len(seen) < pairs // 2:
            k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        else:
            k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return keys


def _keys(rng: random.Random, kind: str, n: int) -> list[str]:
    if kind == "words":
        return _word_keys(rng, n)
    if kind == "uuids":
        return [_uuid(rng) for _ in range(n)]
    raise ValueError(f"unknown key kind {kind!r}; choose words or uuids")


def _values(rng: random.Random, kind: str, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        v = _number(rng, digits) if kind == _NUMBER else _uuid(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _needle(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


# ---------------------------------------------------------------------------- task layouts

def _context_layout(rng, *, haystack: str, needles: list[tuple[float, str]], intro: str, question: str,
                    answer_prefix: str, answers: list[str], metadata: dict, max_units: int) -> _Layout:
    units = filler_stream(haystack, rng, max_units)

    def render(n: int, pad: int = 0):
        context = " ".join(_insert(units[:n], needles) + _pad(pad))
        return f"{intro}\n\n{context}\n\n{question}", answer_prefix

    return _Layout(render, answers, metadata)


def _niah(rng, *, haystack: str, num_keys: int, num_values: int, num_queries: int, key_kind: str,
          value_kind: str, depth_range, stratum, max_units: int, listing: bool = False) -> _Layout:
    """Needles in a haystack: `num_keys` keys (the first `num_queries` asked), `num_values` values each."""
    if haystack == "needles":
        keys = _keys(rng, key_kind, num_keys + max_units)
        asked, distractor_keys = keys[:num_queries], keys[num_keys:]
    else:
        keys = _keys(rng, key_kind, num_keys)
        asked, distractor_keys = keys[:num_queries], []
    values = _values(rng, value_kind, num_keys * num_values + len(distractor_keys))
    table = {k: values[i * num_values:(i + 1) * num_values] for i, k in enumerate(keys[:num_keys])}
    placed = [(k, v) for k in keys[:num_keys] for v in table[k]]
    rng.shuffle(placed)
    depths = _depths(rng, len(placed), depth_range, stratum)
    needles = [(d, _needle(k, v, value_kind)) for d, (k, v) in zip(depths, placed)]
    answers = [v for k, v in placed if k in asked]  # in order of appearance
    meta = {"keys": asked, "depths": [round(d, 4) for d, (k, _) in zip(depths, placed) if k in asked],
            "num_needles": len(placed), "haystack": haystack}
    noun = f"special magic {value_kind}"
    count = _COUNT_WORDS.get(num_values, str(num_values))
    plural = num_keys > 1 or num_values > 1
    intro = (f"Several {noun}s are hidden in the text below. Read it carefully and remember them; "
             f"a question about them follows the text." if plural else
             f"A {noun} is hidden in the text below. Read it carefully and remember it; "
             f"a question about it follows the text.")
    if listing:
        question = (f"List the {count} {noun}s for {asked[0]} in the text above, "
                    f"in the order they appear, separated by commas.")
        prefix = f"The {count} {noun}s for {asked[0]} are:"
    elif num_queries > 1:
        names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = f"What are all the {noun}s for {names} in the text above?"
        prefix = f"The {noun}s for {names} in the text above are:"
    elif num_values > 1:
        question = f"What are all the {noun}s for {asked[0]} in the text above?"
        prefix = f"The {noun}s for {asked[0]} in the text above are:"
    else:
        question = f"What is the {noun} for {asked[0]} in the text above?"
        prefix = f"The {noun} for {asked[0]} in the text above is:"

    if haystack != "needles":
        return _context_layout(rng, haystack=haystack, needles=needles, intro=intro, question=question,
                               answer_prefix=prefix, answers=answers, metadata=meta, max_units=max_units)
    distractors = [_needle(k, v, value_kind) for k, v in zip(distractor_keys, values[len(placed):])]

    def render(n: int, pad: int = 0):
        context = " ".join(_insert(distractors[:n], needles) + _pad(pad))
        return f"{intro}\n\n{context}\n\n{question}", prefix

    return _Layout(render, answers, meta)


def _variable_tracking(rng, *, haystack: str, num_chains: int, num_hops: int, depth_range, stratum,
                       max_units: int) -> _Layout:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        s = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if s not in seen:
            seen.add(s)
            names.append(s)
    values = _values(rng, _NUMBER, num_chains, digits=5)
    statements: list[list[str]] = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        statements.append([f"VAR {chain[0]} = {values[c]}."] +
                          [f"VAR {chain[h + 1]} = VAR {chain[h]}." for h in range(num_hops)])
    # interleave chains keeping each chain's order: the j-th statement of every chain in round j
    ordered = []
    for j in range(num_hops + 1):
        order = list(range(num_chains))
        rng.shuffle(order)
        ordered.extend(statements[c][j] for c in order)
    depths = _depths(rng, len(ordered), depth_range, stratum)
    needles = list(zip(depths, ordered))
    answers = names[:num_hops + 1]
    value = values[0]
    meta = {"value": value, "num_chains": num_chains, "num_hops": num_hops, "haystack": haystack,
            "depths": [round(d, 4) for d, s in needles if s in statements[0]]}
    intro = "Memorize and track the chain of variable assignments hidden in the following text."
    question = f"Question: Find every variable that is assigned the value {value} in the text above."
    prefix = (f"Answer: Following the chain of assignments in the text above, {num_hops + 1} variables "
              f"are assigned the value {value}; they are:")
    return _context_layout(rng, haystack=haystack, needles=needles, intro=intro, question=question,
                           answer_prefix=prefix, answers=answers, metadata=meta, max_units=max_units)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: its builder's fixed arguments, the scoring metric and the default new-token budget."""

    kind: str
    kwargs: dict
    metric: str = "all"
    max_new_tokens: int = 32


TASKS: dict[str, TaskSpec] = {
    "niah_single": TaskSpec("niah", dict(haystack="essay", num_keys=1, num_values=1, num_queries=1,
                                         key_kind="words", value_kind=_NUMBER)),
    "niah_multikey_1": TaskSpec("niah", dict(haystack="essay", num_keys=4, num_values=1, num_queries=1,
                                             key_kind="words", value_kind=_NUMBER)),
    "niah_multikey_2": TaskSpec("niah", dict(haystack="needles", num_keys=1, num_values=1, num_queries=1,
                                             key_kind="words", value_kind=_NUMBER)),
    "niah_multikey_3": TaskSpec("niah", dict(haystack="needles", num_keys=1, num_values=1, num_queries=1,
                                             key_kind="uuids", value_kind=_UUID), max_new_tokens=48),
    "niah_multivalue": TaskSpec("niah", dict(haystack="essay", num_keys=1, num_values=4, num_queries=1,
                                             key_kind="words", value_kind=_NUMBER), max_new_tokens=64),
    "niah_multiquery": TaskSpec("niah", dict(haystack="essay", num_keys=4, num_values=1, num_queries=4,
                                             key_kind="words", value_kind=_NUMBER), max_new_tokens=64),
    "variable_tracking": TaskSpec("vt", dict(haystack="noise", num_chains=1, num_hops=4)),
    "niah_multivalue_list": TaskSpec("niah", dict(haystack="essay", num_keys=1, num_values=3, num_queries=1,
                                                  key_kind="words", value_kind=_NUMBER, listing=True),
                                     max_new_tokens=40),
}


def make_samples(task: str, tokenizer, *, length: int, n: int, seed: int = 0, chat: bool = False,
                 depth_range: tuple[float, float] = (0.0, 1.0), **overrides) -> list[Sample]:
    """`n` samples of `task` with prompts of at most `length` tokens (and within 5%).

    Deterministic in (task, length, n, seed, chat, overrides). `overrides` replace the task's builder
    arguments (e.g. `haystack="noise"`, `num_keys=8`, `num_values=3`, `num_chains=2`, `num_hops=3`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    if length < 1 or n < 1:
        raise ValueError(f"need length >= 1 and n >= 1, got length={length}, n={n}")
    a, b = depth_range
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"depth_range={depth_range} must satisfy 0 <= start < end <= 1")
    spec = TASKS[task]
    kwargs = {**spec.kwargs, **overrides}
    unknown = set(overrides) - set(spec.kwargs)
    if unknown:
        raise ValueError(f"task {task!r} has no arguments {sorted(unknown)}; it takes {sorted(spec.kwargs)}")
    if kwargs.get("haystack") not in ("essay", "noise", "needles") or (
            spec.kind == "vt" and kwargs["haystack"] == "needles"):
        raise ValueError(f"haystack={kwargs.get('haystack')!r} is not valid for task {task!r}")
    max_units = length // 3 + 16
    out = []
    for i in range(n):
        rng = random.Random(f"{task}|{length}|{seed}|{i}")
        builder = _niah if spec.kind == "niah" else _variable_tracking
        layout = builder(rng, depth_range=depth_range, stratum=(i, n), max_units=max_units, **kwargs)
        text, ids, units = _fit(layout, tokenizer, length, chat, max_units)
        out.append(Sample(task=task, index=i, length=length, tokens=ids, text=text, answers=layout.answers,
                          metric=spec.metric, max_new_tokens=spec.max_new_tokens,
                          metadata={**layout.metadata, "filler_units": units}))
    return out

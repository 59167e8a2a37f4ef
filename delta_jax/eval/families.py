"""Text families with a recall tail, made offline from a seed: the prompts of the fidelity measures.

Every sample is a `RecallSample`: a body (early content first, then filler of the family's kind) and, at
the end, a recall tail of at most `tail_tokens` tokens that repeats content of the body's first part.
`value_positions` index the tail tokens only that early content can predict. Families (`FAMILIES`):
- `records`: key: value records, prose filler, the records again (`recall_samples`, the README's text);
- `prose`: a chronicle whose opening paragraph is quoted again at the end;
- `kv`: one long list of key: value lines; the tail looks the first entries up again;
- `code`: a generated Python module: settings and helpers defined at the top, functions and classes
  using them below, and a self-check at the end asserting the settings' values and calling the helpers
  with their parameter names;
- `qa`: documents about invented organisations, then questions with answers about the first documents.

Filler holds no digits, and each recalled value occurs in the body once, inside the first `head` tokens.
Prompts hold at most `length` tokens (within 1% from 4K on; whole units of filler, so up to a code
function short at 1K); the word pools last to about 24K tokens.

    samples = family_samples("code", tokenizer, length=4000, n=50, seed=0)
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

from delta_jax.eval.corpus import ESSAY, filler_stream, sentence
from delta_jax.eval.tasks import _ADJECTIVES, _NOUNS, _number, _word_keys, encode

TAIL_TOKENS = 150


@dataclasses.dataclass
class RecallSample:
    """Token ids, the length of the recall tail (last `tail` tokens), the recalled value token indices,
    the recalled (cue, value) records in tail order, and `head`: the body's first tokens, which hold
    everything the tail recalls."""

    tokens: list[int]
    tail: int
    value_positions: list[int]
    records: list[tuple[str, str]]
    head: int = 0


def _pieces(tokenizer, pieces) -> tuple[list[int], list[int]]:
    """Ids of `pieces` [(text, is_value)] encoded one by one, and the offsets of the value tokens."""
    ids: list[int] = []
    values: list[int] = []
    for text, is_value in pieces:
        piece = encode(tokenizer, text, add_special_tokens=False)
        if is_value:
            values += range(len(ids), len(ids) + len(piece))
        ids += piece
    return ids, values


def recall_samples(tokenizer, *, length: int, n: int, seed: int = 0, pairs: int = 8) -> list[RecallSample]:
    """`n` recall texts of at most `length` tokens (records early, filler, the records recalled at the end)."""
    if pairs < 1 or n < 1:
        raise ValueError(f"need pairs >= 1 and n >= 1, got pairs={pairs}, n={n}")
    out = []
    for i in range(n):
        rng = random.Random(f"recall|{length}|{seed}|{i}")
        keys = _word_keys(rng, pairs)
        records = [(k, _number(rng, 7)) for k in keys]
        head = "Here is a list of records, one key and its value per line.\n" + "".join(
            f"{k}: {v}\n" for k, v in records)
        recalled = list(records)
        rng.shuffle(recalled)
        tail_ids, value_offsets = _pieces(tokenizer, [("\n\nThe same records again:\n", False)] + [
            p for k, v in recalled for p in ((f"{k}:", False), (f" {v}", True), ("\n", False))])
        head_ids = encode(tokenizer, head, add_special_tokens=True)
        budget = length - len(head_ids) - len(tail_ids)
        if budget < 0:
            raise ValueError(f"length={length} tokens is too short for {pairs} recall pairs "
                             f"({len(head_ids) + len(tail_ids)} tokens without filler)")
        filler = encode(tokenizer, " ".join(filler_stream("essay", rng, budget // 4 + 8)),
                        add_special_tokens=False)[:budget]
        tokens = head_ids + filler + tail_ids
        start = len(head_ids) + len(filler)
        out.append(RecallSample(tokens=tokens, tail=len(tail_ids), value_positions=[start + o for o in value_offsets],
                                records=recalled, head=len(head_ids)))
    return out


@dataclasses.dataclass
class _Parts:
    """A family's sample before tokenization: the `head` text, an endless stream of filler `units`, the
    tail's `intro` and its `items` [((cue, value), [(text, is_value), ...])] in tail order."""

    head: str
    units: Iterator[str]
    intro: str
    items: list


def _assemble(tokenizer, parts: _Parts, *, length: int, tail_tokens: int) -> RecallSample:
    """Head, as many filler units as fit (later smaller units close the gap), and the tail items that fit
    in `tail_tokens` tokens."""
    tail, values = _pieces(tokenizer, [(parts.intro, False)])
    records = []
    for record, pieces in parts.items:
        ids, offs = _pieces(tokenizer, pieces)
        if len(tail) + len(ids) > tail_tokens:
            break
        values += [len(tail) + o for o in offs]
        tail += ids
        records.append(record)
    if len(records) < 2:
        raise ValueError(f"tail_tokens={tail_tokens} holds fewer than two recalled items")
    head = encode(tokenizer, parts.head, add_special_tokens=True)
    budget = length - len(head) - len(tail)
    if budget < 0:
        raise ValueError(f"length={length} tokens is too short: head and tail alone take {len(head) + len(tail)}")
    filler: list[int] = []
    misses = 0
    for unit in parts.units:
        ids = encode(tokenizer, unit, add_special_tokens=False)
        if len(filler) + len(ids) <= budget:
            filler += ids
        else:
            misses += 1
            if misses == 16:
                break
    start = len(head) + len(filler)
    return RecallSample(tokens=head + filler + tail, tail=len(tail), value_positions=[start + o for o in values],
                        records=records, head=len(head))


# ---------------------------------------------------------------------------- prose

def _prose_units(rng: random.Random, paragraph: int = 6) -> Iterator[str]:
    """Essay sentences, a paragraph break before every `paragraph`-th."""
    i = 0
    while True:
        yield ("\n\n" if i % paragraph == 0 else " ") + ESSAY[rng.randrange(len(ESSAY))]
        i += 1


def _prose(rng: random.Random) -> _Parts:
    """A chronicle whose opening paragraph is quoted at the end; no filler sentence ends like an opening one."""
    opening: list[tuple[str, str]] = []
    while len(opening) < 10:
        subject, predicate = sentence(rng)
        if all(p != predicate for _, p in opening) and not any(e.endswith(" " + predicate) for e in ESSAY):
            opening.append((subject, predicate))
    town = rng.choice(_NOUNS).title()
    head = f"A Chronicle of {town}\n\n" + " ".join(" ".join(s) for s in opening)
    items = [((subject, predicate), [((" " if i else "") + subject, False), (" " + predicate, True)])
             for i, (subject, predicate) in enumerate(opening)]
    return _Parts(head, _prose_units(rng), "\n\nTo close, the opening paragraph of this chronicle once more:\n", items)


# ---------------------------------------------------------------------------- key-value list

def _kv(rng: random.Random, first: int = 12) -> _Parts:
    """One long registry of `key: value` lines; the tail looks up the first `first` entries again."""
    keys = iter(_word_keys(rng, 3000))
    used: set[str] = set()

    def value() -> str:
        while True:
            v = _number(rng, 7)
            if v not in used:
                used.add(v)
                return v

    top = [(next(keys), value()) for _ in range(first)]
    name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    head = f"Registry of the {name} archive: one key and its value per line.\n" + "".join(
        f"{k}: {v}\n" for k, v in top)
    units = (f"{k}: {value()}\n" for k in keys)
    looked = list(top)
    rng.shuffle(looked)
    items = [((k, v), [(f"{k}:", False), (f" {v}", True), ("\n", False)]) for k, v in looked]
    return _Parts(head, units, "\nLook-up of entries from the top of the registry:\n", items)


# ---------------------------------------------------------------------------- code

_VERBS = ("load", "merge", "parse", "render", "collect", "update", "resolve", "validate", "normalize", "encode",
          "fetch", "build", "filter", "group", "sort", "split", "format", "count", "prune", "index", "rank",
          "score", "flatten", "restore", "archive", "publish", "schedule", "compare", "match", "export")
_PARAMS = ("table", "map", "items", "names", "path", "limit", "rows", "index", "cache", "queue", "flags", "key",
           "records", "lookup", "prefix", "budget")
_SETTINGS = ("LIMIT", "TIMEOUT", "PORT", "CAPACITY", "BATCH", "RETRIES", "INTERVAL", "THRESHOLD", "QUOTA",
             "WINDOW", "BACKLOG", "DEPTH")
_CLASSES = ("Store", "Registry", "Builder", "Cache", "Index", "Queue", "Planner", "Router", "Ledger", "Pool",
            "Tracker", "Catalog")

_HELPER_BODIES = (
    '    result = defaultdict(list)\n    for record in {a}:\n        key = record.get({b})\n'
    '        if key is not None:\n            result[key].append(record)\n'
    '    if {c} is not None:\n        result = {c}(result)\n    return dict(result)',
    '    seen = set()\n    out = []\n    for item in {a}:\n        name = item.get("name", {b})\n'
    '        if name in seen or ({c} is not None and not {c}(item)):\n            continue\n'
    '        seen.add(name)\n        out.append(item)\n    return out',
    '    path = os.path.join({b}, "{noun}.json")\n    with open(path) as handle:\n'
    '        data = json.load(handle)\n    rows = [row for row in data if row.get("kind") in {a}]\n'
    '    return rows if {c} is None else rows[:{c}]',
)

_FILLER_FUNCTIONS = (
    '\n\n\ndef {name}({a}, {b}):\n    """{Verb} each {noun} of `{a}` with `{b}`."""\n    out = []\n'
    '    for item in {a}:\n        value = {helper}(item, {b})\n        if value:\n            out.append(value)\n'
    '    return out',
    '\n\n\ndef {name}({a}, {b}=None):\n    """{Verb} the {noun} entries, keeping the order of `{a}`."""\n'
    '    if not {a}:\n        return []\n    grouped = {helper}({a}, {b})\n'
    '    return sorted(grouped, key=lambda entry: str(entry))',
    '\n\n\ndef {name}({a}):\n    """Returns the {noun} names of `{a}` that pass `{other}`."""\n'
    '    names = [entry.get("name") for entry in {a}]\n    return [name for name in names if {other}([name])]',
)

_FILLER_CLASS = (
    '\n\n\nclass {cls}:\n    """Keeps the {noun} state of one {noun2}."""\n\n'
    '    def __init__(self, {a}, {b}=None):\n        self.{a} = {a}\n        self.{b} = {b} or {{}}\n\n'
    '    def {verb}(self, key):\n        value = self.{b}.get(key)\n        if value is None:\n'
    '            value = {helper}(self.{a}, key)\n            self.{b}[key] = value\n        return value\n\n'
    '    def clear(self):\n        self.{b}.clear()'
)


def _code_units(rng: random.Random, helpers: list[str], settings: list[str], reserved: set[str]) -> Iterator[str]:
    """Functions, classes and short aliases that call the module's helpers and earlier functions; their
    parameters avoid the `reserved` names (the helpers')."""
    names = list(helpers)
    while True:
        noun, noun2, verb = rng.choice(_NOUNS), rng.choice(_NOUNS), rng.choice(_VERBS)
        a, b = f"{noun}_{rng.choice(_PARAMS)}", f"{noun2}_{rng.choice(_PARAMS)}"
        if a == b or {a, b} & reserved:
            continue
        kind = rng.random()
        fields = dict(noun=noun, noun2=noun2, verb=verb, Verb=verb.title(), a=a, b=b,
                      helper=rng.choice(helpers), other=rng.choice(names))
        if kind < 0.15:
            alias = f"{rng.choice(_ADJECTIVES)}_{noun}".upper()
            yield f"\n\n\n# {verb.title()} the {noun} entries with the {noun2} settings.\n{alias} = {rng.choice(settings)}"
        elif kind < 0.45:
            yield _FILLER_CLASS.format(cls=f"{noun.title()}{noun2.title()}{rng.choice(_CLASSES)}", **fields)
        else:
            name = f"{verb}_{noun}_{noun2}s"
            yield rng.choice(_FILLER_FUNCTIONS).format(name=name, **fields)
            names.append(name)


def _code(rng: random.Random, settings: int = 6, helpers: int = 3) -> _Parts:
    """A Python module: settings and helpers at the top, code using them, a self-check at the end."""
    values: list[str] = []
    while len(values) < settings:
        v = _number(rng, rng.choice((4, 5, 6)))
        if v not in values:
            values.append(v)
    setting_names: list[str] = []
    while len(setting_names) < settings:
        s = f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}_{rng.choice(_SETTINGS)}".upper()
        if s not in setting_names:
            setting_names.append(s)
    defs, calls, params = [], [], set()
    for _ in range(helpers):
        noun = rng.choice(_NOUNS)
        name = f"{rng.choice(_VERBS)}_{noun}_records"
        a, b, c = (f"{rng.choice(_NOUNS)}_{p}" for p in rng.sample(_PARAMS, 3))
        params |= {a, b, c}
        body = rng.choice(_HELPER_BODIES).format(a=a, b=b, c=c, noun=noun)
        defs.append((name, f'\n\n\ndef {name}({a}, {b}, {c}=None):\n    """{rng.choice(_VERBS).title()} the {noun} '
                           f'records of `{a}` by `{b}`."""\n{body}'))
        calls.append(((f"{name}(", f"{a}, {b}, {c}"),
                      [(f"\n    {name}(", False), (a, True), ("=[],", False), (f" {b}", True), ('="id",', False),
                       (f" {c}", True), ("=None)", False)]))
    head = (f'"""Helpers for the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} service: settings, loading and '
            f'merging of records."""\n\nimport json\nimport os\nfrom collections import defaultdict\n\n'
            + "\n".join(f"{s} = {v}" for s, v in zip(setting_names, values)) + "".join(d for _, d in defs))
    asserts = [((f"{s} ==", v), [(f"\n    assert {s} ==", False), (f" {v}", True)])
               for s, v in zip(setting_names, values)]
    items = asserts + calls
    rng.shuffle(items)
    return _Parts(head, _code_units(rng, [n for n, _ in defs], setting_names, params),
                  '\n\n\ndef self_check():\n    """Checks the settings and helpers defined at the top of this module."""',
                  items)


# ---------------------------------------------------------------------------- multi-document QA

_FIRST = ("Mira", "Tomas", "Elena", "Jonah", "Ines", "Pavel", "Clara", "Rufus", "Nadia", "Oskar", "Lena", "Felix",
          "Greta", "Hugo", "Alma", "Bruno", "Celia", "Dorian", "Edith", "Gideon", "Hester", "Ivo", "Juno", "Kasper",
          "Livia", "Magnus", "Nora", "Otto", "Petra", "Quentin", "Rosa", "Silas", "Thea", "Ulric", "Vera", "Wendel")
_LAST = ("Holloway", "Fenwick", "Ashdown", "Brightwater", "Calloway", "Dunmore", "Everly", "Fairbairn", "Garrow",
         "Hartwell", "Ingram", "Jessop", "Kettering", "Lockhart", "Marlowe", "Northcott", "Oakes", "Penhallow",
         "Quarrie", "Redfern", "Sallow", "Thornbury", "Underhill", "Whitlock", "Yarrow", "Ellery")
_TOWN_START = ("Ash", "Bram", "Cold", "Dun", "Elm", "Fern", "Glen", "Hazel", "Iron", "Kings", "Lark", "Marl",
               "North", "Oak", "Pen", "Raven", "Salt", "Thorn", "Wester", "Wolf")
_TOWN_END = ("ford", "brook", "holm", "wick", "field", "mere", "stead", "ton", "bury", "haven", "combe", "ley")
_KINDS = ("Guild", "Company", "Society", "Cooperative", "Press", "Trust", "Foundry", "Workshop", "Institute", "League")
_MATERIALS = ("copper", "oak", "glass", "woollen", "silver", "brass", "linen", "clay", "paper", "iron", "cedar", "tin")
_GOODS = ("kettles", "lanterns", "compasses", "maps", "bells", "toys", "candles", "chess sets", "telescopes",
          "blankets", "boats", "clocks", "kites", "barrels")


def _document(rng: random.Random, d: dict) -> list[str]:
    """One document as units (its title with the first sentence, then one sentence each): its facts,
    each stated once, among prose sentences."""
    facts = [f"It is best known for its {d['product']}.", f"Today the {d['kind'].lower()} is led by {d['leader']}."]
    body = []
    for fact in facts:
        body += filler_stream("essay", rng, rng.randint(1, 3)) + [fact]
    body += filler_stream("essay", rng, rng.randint(1, 3))
    return ([f"\n\nDocument: The {d['org']}\nThe {d['org']} was founded by {d['founder']} in {d['town']}."]
            + [" " + x for x in body])


def _entities(rng: random.Random) -> Iterator[dict]:
    """Organisations with their facts; no name, town or product repeats."""
    seen: set[str] = set()

    def fresh(make):
        for _ in range(10000):
            x = make()
            if x not in seen:
                seen.add(x)
                return x
        raise ValueError(f"the qa family ran out of distinct names after {len(seen)}: choose a shorter length")

    while True:
        kind = rng.choice(_KINDS)
        yield {"org": fresh(lambda: f"{rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()} {kind}"),
               "kind": kind,
               "founder": fresh(lambda: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"),
               "leader": fresh(lambda: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"),
               "town": fresh(lambda: rng.choice(_TOWN_START) + rng.choice(_TOWN_END)),
               "product": fresh(lambda: f"{rng.choice(_MATERIALS)} {rng.choice(_GOODS)}")}


def _qa(rng: random.Random, first: int = 3) -> _Parts:
    """Documents about invented organisations; the questions ask about the first `first` documents."""
    docs = _entities(rng)
    top = [next(docs) for _ in range(first)]
    head = ("Below are documents about several organisations, followed by questions about them."
            + "".join(u for d in top for u in _document(rng, d)))
    items = []
    for d in top:
        org = d["org"]
        for q, prefix, key in ((f"Who founded the {org}?", "", "founder"),
                               (f"In which town was the {org} founded?", "", "town"),
                               (f"What is the {org} best known for?", " Its", "product"),
                               (f"Who leads the {org} today?", "", "leader")):
            items.append(((q, d[key]), [(f"Question: {q}\nAnswer:{prefix}", False), (f" {d[key]}", True),
                                        (".\n", False)]))
    rng.shuffle(items)
    return _Parts(head, (u for d in docs for u in _document(rng, d)), "\n\nQuestions about the documents above, with their answers.\n",
                  items)


_BUILDERS = {"prose": _prose, "kv": _kv, "code": _code, "qa": _qa}
FAMILIES = ("records",) + tuple(_BUILDERS)


def family_samples(family: str, tokenizer, *, length: int, n: int, seed: int = 0,
                   tail_tokens: int = TAIL_TOKENS) -> list[RecallSample]:
    """`n` samples of `family` with at most `length` tokens and a recall tail of at most `tail_tokens`
    (deterministic in family, length, n, seed and tail_tokens)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown text family {family!r}; choose one of {FAMILIES}")
    if n < 1 or length < 1:
        raise ValueError(f"need length >= 1 and n >= 1, got length={length}, n={n}")
    if family == "records":
        out = recall_samples(tokenizer, length=length, n=n, seed=seed)
        if max(s.tail for s in out) > tail_tokens:
            raise ValueError(f"tail_tokens={tail_tokens} is shorter than the records' recall tail")
        return out
    return [_assemble(tokenizer, _BUILDERS[family](random.Random(f"{family}|{length}|{seed}|{i}")),
                      length=length, tail_tokens=tail_tokens) for i in range(n)]

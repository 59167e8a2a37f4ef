"""Built-in filler text: varied English prose from templates, and short repeated "noise" sentences.

Neither contains digits, so a planted number or UUID can only come from a needle.
"""

from __future__ import annotations

import random

_SUBJECTS = (
    "The old lighthouse keeper", "A young botanist", "The village council", "Our neighbour across the lane",
    "The travelling musician", "A patient carpenter", "The head librarian", "A group of students",
    "The ferry captain", "An elderly shepherd", "The baker on the corner", "A curious child",
    "The museum guide", "A retired sailor", "The night watchman", "A quiet mathematician",
    "The river pilot", "A weaver from the hills", "The orchard owner", "A wandering painter",
    "The station master", "A diligent clerk", "The mountain guide", "A cheerful gardener",
    "The choir director", "An apprentice potter", "The harbour master", "A tired messenger",
    "The school teacher", "A careful surveyor", "The beekeeper", "A famous chef",
)

_VERBS = (
    "walked slowly along", "wrote a long letter about", "spent the afternoon near", "told a story about",
    "drew a careful map of", "remembered the winter at", "planted new trees beside", "sang softly near",
    "repaired the fence around", "collected smooth stones from", "argued cheerfully about",
    "waited patiently beside", "read an old book about", "painted a picture of", "searched all morning for",
    "built a small cabin near", "listened to the wind over", "counted the boats in", "cleaned the windows of",
    "studied the birds around", "described the colours of", "lost a glove somewhere in",
    "found a forgotten path through", "watched the clouds above", "swept the dust from",
    "carried fresh bread to", "measured the shadows on", "dreamed of returning to",
)

_OBJECTS = (
    "the northern harbour", "the abandoned mill", "the quiet market square", "the narrow stone bridge",
    "the orchard behind the chapel", "the foggy marshland", "the steep vineyard", "the crowded railway station",
    "the sunlit meadow", "the silent library", "the frozen lake", "the ancient oak forest",
    "the busy workshop", "the windy cliffs", "the little island", "the cathedral tower",
    "the copper mine", "the lavender fields", "the crooked lighthouse", "the sleepy fishing village",
    "the university garden", "the salt flats", "the old observatory", "the muddy riverbank",
    "the painted theatre", "the olive grove", "the mountain pass", "the empty ballroom",
)

_CLAUSES = (
    "before the first snow arrived", "while the bells were ringing", "as the tide went out",
    "long after everyone had gone home", "during a sudden summer storm", "when the lamps were lit",
    "although nobody asked them to", "because the morning was so bright", "until the light faded",
    "as if it were the most natural thing", "while the kettle slowly boiled", "on a grey and gentle morning",
    "despite the cold wind from the sea", "once the harvest was finished", "whenever the market was closed",
    "after a long and difficult week", "just as the swallows returned", "while the town was still asleep",
    "when the river rose over its banks", "as the evening train pulled away",
)

_REFLECTIONS = (
    "Nobody could say exactly why it mattered so much.", "It was the kind of day that people remember.",
    "Some said it was a sign of better times to come.", "The details changed each time the story was told.",
    "Later, the event was written into the parish records.", "Few things in the valley ever stayed the same.",
    "Everyone agreed it had been worth the trouble.", "The neighbours talked about it for many weeks.",
    "It seemed ordinary then, but it was not.", "That was how the old customs slowly faded.",
    "Children still play a game that began on that day.", "Even the stray cats seemed to notice.",
    "The weather, as always, had the final word.", "Such moments are rarely planned in advance.",
    "Its meaning became clear only many seasons later.", "In the end, patience proved more useful than speed.",
)

NOISE = (
    "The meadow is wide.", "The stream runs cold.", "The clouds drift east.",
    "Here we rest.", "Onward and homeward once more.",
)


def sentence(rng: random.Random) -> tuple[str, str]:
    """A template sentence as (subject, predicate): `" ".join` of the two is the sentence, ending in a stop."""
    subject = rng.choice(_SUBJECTS)
    return subject, f"{rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_CLAUSES)}."


def _build_essay(count: int = 480, seed: int = 20250511) -> tuple[str, ...]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < count:
        if rng.random() < 0.2:
            s = rng.choice(_REFLECTIONS)
        else:
            s = " ".join(sentence(rng))
        if s in seen and s not in _REFLECTIONS:
            continue
        seen.add(s)
        out.append(s)
    return tuple(out)


ESSAY = _build_essay()

HAYSTACKS = ("essay", "noise", "needles")


def filler_stream(kind: str, rng: random.Random, count: int) -> list[str]:
    """`count` filler sentences: `essay` (random prose sentences) or `noise` (the noise block repeated)."""
    if kind == "essay":
        return [ESSAY[rng.randrange(len(ESSAY))] for _ in range(count)]
    if kind == "noise":
        return [NOISE[i % len(NOISE)] for i in range(count)]
    raise ValueError(f"unknown filler kind {kind!r}; choose essay or noise")


def prose(rng: random.Random, sentences: int, paragraph: int = 6) -> str:
    """Long natural-looking prose of `sentences` sentences in paragraphs (for perplexity)."""
    parts = filler_stream("essay", rng, sentences)
    return "\n\n".join(" ".join(parts[i:i + paragraph]) for i in range(0, len(parts), paragraph))

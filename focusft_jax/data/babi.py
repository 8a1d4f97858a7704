"""Offline BABILong-format data: a simulated bAbI world (qa1..qa5) whose
facts are hidden in background text, sized to a token budget.

Used by the evaluation (`python -m eval.babilong --data generate`, labelled
"BABILong-format (regenerated)") and by the built-in training data of the
tiny default config. The facts keep their order and go into uniformly random
gaps between background sentences (several may share a gap), background taken
in order from a random start in a corpus of plain-text books (or a built-in
generated filler), until the context reaches the budget of its nominal
length: about N*1000-300 GPT-2 tokens for "Nk" and N*1000000-300 for "NM"
("0k": the facts alone).
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence
from pathlib import Path

from focusft_jax.errors import DataError

REGENERATED_LABEL = "BABILong-format (regenerated)"
GENERATED_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
# The official length names (booydar/babilong data/create_tasks.py, collect_results.py):
# '<N>k' up to 512k, then '<N>M' (1M, 2M, 10M), decimal: 1M is 1_000_000 tokens.
# Exactly 'k' and 'M', ASCII digits: those are the names of the dataset splits
# and of the prediction files, so '1K', '1m' or '1.5k' name nothing official.
_LENGTH_RE = re.compile(r"([0-9]+)([kM])")
_LENGTH_UNIT = {"k": 1, "M": 1000}
LENGTH_FORM = "'<N>k' or '<N>M' (e.g. 0k, 4k, 128k, 512k, 1M, 10M)"


def length_value(length: str) -> int:
    """A nominal length in thousands of tokens: "8k" -> 8, "1M" -> 1000,
    "10M" -> 10000. A DataError for anything not of the form <N>k or <N>M."""
    m = _LENGTH_RE.fullmatch(length) if isinstance(length, str) else None
    if not m:
        raise DataError(f"BABILong length {length!r} is not of the form {LENGTH_FORM}")
    return int(m.group(1)) * _LENGTH_UNIT[m.group(2)]


def token_budget(length: str) -> int:
    """Context budget of a nominal length, in (GPT-2) tokens: its size minus
    300 for the prompt, as the official data was made (N*1000-300 for Nk,
    N*1000000-300 for NM), 0 for 0k."""
    n = length_value(length)
    return 0 if n == 0 else n * 1000 - 300


# ---------------------------------------------------------------- token counting


@dataclass
class TokenCounter:
    """Counts tokens of text for the context budget; `name` goes into the result."""

    name: str
    count: Callable[[str], int]

    def __call__(self, text: str) -> int:
        return self.count(text)

    def many(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]


def gpt2_counter(path: str | None = None) -> TokenCounter:
    """The budget counter: a tokenizer at `path` (a directory or a
    tokenizer.json) when given; else GPT-2 from the local Hugging Face cache
    when it is there (never downloaded); else an approximation, the number of
    GPT-2 byte-level pre-tokens (words with their leading space,
    punctuation runs): a lower bound that is within a few percent of GPT-2's
    count on plain English prose."""
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            from tokenizers import Tokenizer

            tk = Tokenizer.from_file(str(p))
            return TokenCounter(f"tokenizer file {p}", lambda t: len(tk.encode(t, add_special_tokens=False).ids))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p))
        return TokenCounter(f"tokenizer {p}", lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
        return TokenCounter("gpt2 (local cache)", lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    except Exception:
        pass
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return TokenCounter(
        "approximate GPT-2 count (byte-level pre-tokens)", lambda t: len(pre.pre_tokenize_str(t))
    )


# ---------------------------------------------------------------- background text

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences: a split after . ! or ? (optionally
    followed by a closing quote or bracket) and whitespace. (The official
    code uses nltk's punkt; this needs no model data.)"""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENT_SPLIT.split(text) if s]


@functools.lru_cache(maxsize=4)
def corpus_sentences(corpus_dir: str) -> tuple[str, ...]:
    """Sentences of every *.txt file under `corpus_dir` (sorted paths; each
    book split on its own)."""
    root = Path(corpus_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: corpus directory does not exist")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{root}: no *.txt files in the corpus directory")
    sents: list[str] = []
    for f in files:
        sents.extend(split_sentences(f.read_text(encoding="utf-8", errors="replace")))
    if not sents:
        raise DataError(f"{root}: the corpus has no sentences")
    return tuple(sents)


# Built-in filler: plain sentences that name no bAbI person, room, object or direction.
_F_SUBJ = (
    "The old sailor", "A quiet traveller", "The young painter", "An elderly farmer", "The village baker",
    "A tired merchant", "The lighthouse keeper", "A curious child", "The grey cat", "A wandering poet",
    "The shepherd", "A stranger from the coast", "The schoolmaster", "The blacksmith", "A small dog",
)
_F_VERB = (
    "watched", "remembered", "described", "admired", "crossed", "followed", "painted", "counted",
    "mended", "carried", "studied", "praised", "ignored", "measured", "visited",
)
_F_OBJ = (
    "the distant hills", "the river at dawn", "a broken lantern", "the stone bridge", "an empty cart",
    "the autumn leaves", "a faded letter", "the harbour lights", "the long road", "a wooden fence",
    "the silver clouds", "the market square", "an old map", "the winter sky", "a row of poplars",
)
_F_TAIL = (
    "before the evening bells", "for a long while", "without a word", "with great care", "in the cold wind",
    "as the rain began", "after the long summer", "while the town slept", "once again", "in silence",
    "with some surprise", "as usual", "at the end of the week", "under a pale moon", "for no clear reason",
)


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_F_SUBJ)} {rng.choice(_F_VERB)} {rng.choice(_F_OBJ)} {rng.choice(_F_TAIL)}."


@functools.lru_cache(maxsize=4)
def filler_sentences(seed: int, n: int = 20000) -> tuple[str, ...]:
    rng = random.Random(f"babilong-filler:{seed}")
    return tuple(filler_sentence(rng) for _ in range(n))


class Background:
    """Background sentences with cached token counts (each counted with its
    leading space, as it sits in the context)."""

    def __init__(self, sentences: Sequence[str], counter: TokenCounter, name: str):
        self.sentences = list(sentences)
        self.counter = counter
        self.name = name
        self._counts: list[int] | None = None

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = self.counter.many([" " + s for s in self.sentences])
        return self._counts

    def take(self, rng: random.Random, budget: int) -> list[str]:
        """Consecutive sentences from a random start (wrapping around) whose
        tokens add up to at most `budget`, as many as fit."""
        if budget <= 0:
            return []
        counts = self.counts
        n = len(self.sentences)
        i = rng.randrange(n)
        out, total = [], 0
        for step in range(10 * n + 1):
            c = counts[(i + step) % n]
            if total + c > budget:
                break
            out.append(self.sentences[(i + step) % n])
            total += c
        return out


# ---------------------------------------------------------------- the bAbI world

PEOPLE = ("Daniel", "John", "Mary", "Sandra")
PEOPLE_QA5 = ("Bill", "Fred", "Jeff", "Mary")
ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKE_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")
DIRECTIONS = ("north", "south", "east", "west")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


@dataclass
class World:
    """People moving between rooms, picking up, dropping and giving objects.
    Each action returns the bAbI sentence stating it."""

    rng: random.Random
    people: Sequence[str]
    loc: dict = field(default_factory=dict)
    holding: dict = field(default_factory=dict)
    holder: dict = field(default_factory=dict)
    obj_room: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    gives: list = field(default_factory=list)

    def __post_init__(self):
        for p in self.people:
            self.loc[p] = None
            self.holding[p] = []
        for o in OBJECTS:
            self.holder[o] = None
            self.obj_room[o] = None
            self.history[o] = []

    def _place(self, o, room):
        self.obj_room[o] = room
        if not self.history[o] or self.history[o][-1] != room:
            self.history[o].append(room)

    def move(self, p) -> str:
        room = self.rng.choice([r for r in ROOMS if r != self.loc[p]])
        self.loc[p] = room
        for o in self.holding[p]:
            self._place(o, room)
        return f"{p} {self.rng.choice(MOVE_VERBS)} the {room}."

    def can_take(self):
        return [
            (p, o)
            for p in self.people
            for o in OBJECTS
            if self.loc[p] is not None and self.holder[o] is None and self.obj_room[o] in (None, self.loc[p])
        ]

    def take(self, p, o) -> str:
        self.holder[o] = p
        self.holding[p].append(o)
        self._place(o, self.loc[p])
        return f"{p} {self.rng.choice(TAKE_VERBS)} the {o} there."

    def can_drop(self):
        return [(p, o) for p in self.people for o in self.holding[p]]

    def drop(self, p, o) -> str:
        self.holder[o] = None
        self.holding[p].remove(o)
        there = " there" if self.rng.random() < 0.5 else ""
        return f"{p} {self.rng.choice(DROP_VERBS)} the {o}{there}."

    def can_give(self):
        return [
            (p, o, q)
            for p in self.people
            for o in self.holding[p]
            for q in self.people
            if q != p and self.loc[q] is not None and self.loc[q] == self.loc[p]
        ]

    def give(self, p, o, q) -> str:
        self.holding[p].remove(o)
        self.holding[q].append(o)
        self.holder[o] = q
        self.gives.append((p, o, q))
        return f"{p} {self.rng.choice(GIVE_VERBS)} the {o} to {q}."

    def step(self, weights: dict) -> str:
        options = [("move", weights.get("move", 0.0), None)]
        for name, cands in (("take", self.can_take()), ("drop", self.can_drop()), ("give", self.can_give())):
            if cands and weights.get(name, 0.0) > 0:
                options.append((name, weights[name], cands))
        r = self.rng.random() * sum(w for _, w, _ in options)
        for name, w, cands in options:
            r -= w
            if r <= 0:
                break
        if name == "move":
            return self.move(self.rng.choice(list(self.people)))
        return getattr(self, name)(*self.rng.choice(cands))


def _qa1(rng):
    w = World(rng, PEOPLE)
    facts = [w.step({"move": 1}) for _ in range(rng.randint(2, 10))]
    p = rng.choice([p for p in PEOPLE if w.loc[p] is not None])
    return facts, f"Where is {p}?", w.loc[p]


def _object_world(rng, lo, hi, ok):
    """Steps a world (moves, takes, drops) for a random number of facts in
    [lo, hi], and on until `ok(world)` returns a question or gives up."""
    w = World(rng, PEOPLE)
    weights = {"move": 0.5, "take": 0.3, "drop": 0.2}
    facts = [w.step(weights) for _ in range(rng.randint(lo, hi))]
    for _ in range(500):
        q = ok(w)
        if q is not None:
            return facts, *q
        facts.append(w.step(weights))
    return None


def _qa2_question(w):
    known = [o for o in OBJECTS if w.obj_room[o] is not None]
    if not known:
        return None
    o = w.rng.choice(known)
    room = w.loc[w.holder[o]] if w.holder[o] is not None else w.obj_room[o]
    return f"Where is the {o}?", room


def _qa3_question(w):
    cands = [o for o in OBJECTS if len(w.history[o]) >= 2 and w.history[o][-1] not in w.history[o][:-1]]
    if not cands:
        return None
    o = w.rng.choice(cands)
    return f"Where was the {o} before the {w.history[o][-1]}?", w.history[o][-2]


def _qa4(rng):
    center, a, b = rng.sample(ROOMS, 3)
    da, db = rng.sample(DIRECTIONS, 2)
    facts = [f"The {a} is {da} of the {center}.", f"The {b} is {db} of the {center}."]
    rng.shuffle(facts)
    answer, d = (a, da) if rng.random() < 0.5 else (b, db)
    if rng.random() < 0.5:
        question = f"What is {d} of the {center}?"
    else:
        question = f"What is the {center} {OPPOSITE[d]} of?"
    return facts, question, answer


_QA5_FORMS = (
    ("Who gave the {o} to {q}?", "p", lambda g, p, o, q: g[1] == o and g[2] == q, 0),
    ("Who did {p} give the {o} to?", "q", lambda g, p, o, q: g[0] == p and g[1] == o, 2),
    ("What did {p} give to {q}?", "o", lambda g, p, o, q: g[0] == p and g[2] == q, 1),
    ("Who received the {o}?", "q", lambda g, p, o, q: g[1] == o, 2),
    ("Who gave the {o}?", "p", lambda g, p, o, q: g[1] == o, 0),
)


def _qa5(rng):
    for _ in range(100):
        w = World(rng, PEOPLE_QA5)
        weights = {"move": 0.45, "take": 0.25, "drop": 0.1, "give": 0.3}
        facts = [w.step(weights) for _ in range(rng.randint(8, 25))]
        for _ in range(200):
            if w.gives:
                break
            facts.append(w.step(weights))
        if not w.gives:
            continue
        p, o, q = w.gives[-1]
        forms = list(_QA5_FORMS)
        rng.shuffle(forms)
        for text, who, match, slot in forms:
            answers = {g[slot] for g in w.gives if match(g, p, o, q)}
            if len(answers) == 1:
                return facts, text.format(p=p, o=o, q=q), {"p": p, "o": o, "q": q}[who]
    raise RuntimeError("qa5 generator found no unambiguous question")  # pragma: no cover


def babi_story(task: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(facts, question, answer) of one simulated bAbI sample of qa1..qa5."""
    if task == "qa1":
        return _qa1(rng)
    if task in ("qa2", "qa3"):
        lo, hi, ok = (6, 20, _qa2_question) if task == "qa2" else (10, 30, _qa3_question)
        for _ in range(100):
            got = _object_world(rng, lo, hi, ok)
            if got is not None:
                return got
        raise RuntimeError(f"{task} generator failed")  # pragma: no cover
    if task == "qa4":
        return _qa4(rng)
    if task == "qa5":
        return _qa5(rng)
    raise DataError(f"the offline generator covers {GENERATED_TASKS}, not {task}")


# ---------------------------------------------------------------- the generator


class BabilongGenerator:
    """BABILong-format samples: simulated bAbI facts in background text.

    corpus_dir: a directory of plain-text books (*.txt); None: the built-in
        generated filler.
    counter: the token counter of the context budget (default `gpt2_counter()`).
    The facts of sample i of a task are the same at every length (as in
    BABILong); only the background changes.
    """

    def __init__(self, seed: int = 0, corpus_dir: str | None = None, counter: TokenCounter | None = None):
        self.seed = seed
        self.counter = counter or gpt2_counter()
        if corpus_dir:
            self.background = Background(corpus_sentences(str(corpus_dir)), self.counter, f"corpus {corpus_dir}")
        else:
            self.background = Background(filler_sentences(seed), self.counter, "built-in generated filler")

    def sample(self, task: str, length: str, index: int) -> dict:
        if task not in GENERATED_TASKS:
            raise DataError(f"--data generate covers {', '.join(GENERATED_TASKS)}; {task} needs the real data")
        facts, question, answer = babi_story(task, random.Random(f"{self.seed}:{task}:{index}"))
        rng = random.Random(f"{self.seed}:{task}:{length}:{index}")
        context = self.hide(facts, token_budget(length), rng)
        return {"input": context, "question": question, "target": answer}

    def hide(self, facts: Sequence[str], budget: int, rng: random.Random) -> str:
        """The facts, in order, in uniformly random gaps of background text
        that fills `budget` tokens (the facts alone when budget is 0)."""
        if budget == 0:
            return " ".join(facts)
        fact_tokens = sum(self.counter.many([" " + f for f in facts]))
        bg = self.background.take(rng, budget - fact_tokens)
        gaps: list[list[str]] = [[] for _ in range(len(bg) + 1)]
        for pos, fact in zip(sorted(rng.randint(0, len(bg)) for _ in facts), facts):
            gaps[pos].append(fact)
        pieces = []
        for i, g in enumerate(gaps):
            pieces.extend(g)
            if i < len(bg):
                pieces.append(bg[i])
        return " ".join(pieces)

    def samples(self, task: str, length: str, n: int) -> list[dict]:
        return [self.sample(task, length, i) for i in range(n)]

    def source(self) -> dict:
        return {
            "kind": "regenerated",
            "label": REGENERATED_LABEL,
            "generator": "focusft_jax.data.babi.BabilongGenerator (simulated bAbI world, qa1..qa5)",
            "background": self.background.name,
            "token_counter": self.counter.name,
            "budget": "N*1000-300 tokens for Nk (N*1000000-300 for NM), facts only for 0k",
            "seed": self.seed,
        }

"""RULER's word lists, from the `wonderwords` package (pin wonderwords==2.2.0:
the lists are part of the benchmark; the version used is recorded in every
result).

* NIAH keys: ``adjective-noun`` over every adjective x noun of wonderwords'
  lists. The official code materialises the sorted set of all ~6 million
  pairs and draws with `random.choice`; drawing the adjective and the noun
  independently from the de-duplicated lists is the same uniform
  distribution over the same set without building it.
* CWE words: the sorted union of wonderwords' nouns, adjectives and verbs.
"""
from __future__ import annotations

import functools
from importlib import resources

REQUIRED_VERSION = "2.2.0"


def wonderwords_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("wonderwords")
    except metadata.PackageNotFoundError:
        return None


def _read(name: str) -> list[str]:
    try:
        files = resources.files("wonderwords.assets")
    except ModuleNotFoundError:
        raise RuntimeError(
            f"RULER needs the word lists of wonderwords=={REQUIRED_VERSION} (pip install wonderwords=={REQUIRED_VERSION})"
        ) from None
    text = files.joinpath(name).read_text(encoding="utf-8")
    return [w.rstrip() for w in text.splitlines(True)]


@functools.lru_cache(maxsize=None)
def nouns() -> tuple[str, ...]:
    return tuple(_read("nounlist.txt"))


@functools.lru_cache(maxsize=None)
def adjectives() -> tuple[str, ...]:
    return tuple(_read("adjectivelist.txt"))


@functools.lru_cache(maxsize=None)
def verbs() -> tuple[str, ...]:
    return tuple(_read("verblist.txt"))


@functools.lru_cache(maxsize=None)
def key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sorted unique adjectives, sorted unique nouns) for adjective-noun keys."""
    return tuple(sorted(set(adjectives()))), tuple(sorted(set(nouns())))


def random_key_word(rng) -> str:
    """One uniformly drawn ``adjective-noun`` key (rng: random.Random)."""
    adjs, ns = key_parts()
    return f"{rng.choice(adjs)}-{rng.choice(ns)}"


@functools.lru_cache(maxsize=None)
def cwe_words() -> tuple[str, ...]:
    """Sorted unique nouns + adjectives + verbs (the CWE vocabulary, before
    the per-run shuffle)."""
    return tuple(sorted(set(nouns()) | set(adjectives()) | set(verbs())))


def version_record() -> str:
    v = wonderwords_version()
    if v is None:
        return "wonderwords missing"
    if v != REQUIRED_VERSION:
        return f"wonderwords {v} (RULER expects {REQUIRED_VERSION}: keys and CWE words differ)"
    return f"wonderwords {v}"

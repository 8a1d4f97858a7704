"""What a result is measured against and how it was made.

* the official benchmark strings (`load_benchmark`): `eval/benchmarks/*.json`,
  copied byte for byte from the official repositories (their `source` field
  names the commit and the Apache-2.0 license);
* the run manifest every result carries (`make_manifest`, EVAL.md "Every
  result records"), with the software versions and the checkout's commit;
* `files_digest`, the short content digest the manifests record for data files.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable

from focusft_jax.evaluation.errors import EvalError

BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"


@functools.lru_cache(maxsize=None)
def _load_benchmark_text(name: str) -> str:
    path = BENCHMARK_DIR / f"{name}.json"
    if not path.exists():
        raise EvalError(f"{path}: benchmark strings missing (expected eval/benchmarks/{name}.json)")
    return path.read_text(encoding="utf-8")


def load_benchmark(name: str) -> dict:
    """The official strings of `name` ("babilong" or "ruler") as a fresh dict."""
    return json.loads(_load_benchmark_text(name))


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """First 16 hex digits of the sha256 of the files' bytes, concatenated in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the focusft-jax checkout running the evaluation: None
    outside a clone (an installed package records its version instead, even
    where site-packages lies inside some other git repository)."""
    root = Path(__file__).resolve().parents[2]  # a clone's top: focusft_jax/evaluation/ is two below
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


MANIFEST_KEYS = (
    "checkpoint",
    "benchmark",
    "tasks",
    "lengths",
    "samples",
    "data_source",
    "tokenizer",
    "chat_template",
    "prompt_parts",
    "decoding",
    "seed",
    "wordlist_version",
    "prefill_attention",
)


def make_manifest(**fields: Any) -> dict:
    """The record EVAL.md asks of every result. Every key of MANIFEST_KEYS
    must be given (None where it does not apply, e.g. no word list for
    BABILong); extra keys are kept. Adds the software versions (and the
    checkout's commit) and a UTC timestamp."""
    missing = [k for k in MANIFEST_KEYS if k not in fields]
    if missing:
        raise EvalError(f"manifest is missing {missing}")
    m = {k: fields.pop(k) for k in MANIFEST_KEYS}
    m.update(fields)
    m["created_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    m["software"] = {
        "python": platform.python_version(),
        "focusft_jax_commit": git_commit(),
        "focusft_jax_version": package_version("focusft-jax"),  # None: run from a clone that is not installed
        **{p: package_version(p) for p in ("transformers", "tokenizers", "jax", "numpy", "wonderwords")},
    }
    return m

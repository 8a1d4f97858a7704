"""BABILong data: the official datasets (hub or a local snapshot) and an
offline generator of the same format.

Records are dicts with ``input`` (the context), ``question`` and ``target``.

Official data (EVAL.md): `RMT-team/babilong` (100 samples per task and
length) and `RMT-team/babilong-1k-samples`; in a dataset repository the
records of one (task, length) are ``data/<task>/<length>.json`` (a JSON
array), or parquet files of that split. `load_local` reads such a directory
(a snapshot of the dataset repository); `load_hub` downloads just the needed
files with `huggingface_hub` and reads the snapshot the same way, recording
the commit it resolved to.

Offline (`BabilongGenerator`): facts of a simulated bAbI world for qa1..qa5
hidden in background sentences. The facts keep their order and go into
uniformly random gaps between background sentences (several may share a gap,
facts before the sentence of their gap), background taken in order from a
random start in a corpus of plain-text books (or a built-in generated
filler), until the context reaches the budget of its nominal length: about
N*1000-300 GPT-2 tokens for "Nk", N*1000000-300 for "NM" ("0k": the facts
alone). Results on this data are labelled "BABILong-format (regenerated)",
never "BABILong".
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from focusft_jax.evaluation.manifest import files_digest

# The offline generator lives in the library (the built-in training data uses it too).
from focusft_jax.data.babi import (  # noqa: F401
    GENERATED_TASKS,
    LENGTH_FORM,
    REGENERATED_LABEL,
    Background,
    BabilongGenerator,
    TokenCounter,
    babi_story,
    corpus_sentences,
    filler_sentences,
    gpt2_counter,
    length_value,
    split_sentences,
    token_budget,
)
from focusft_jax.errors import DataError

HUB_DATASETS = ("RMT-team/babilong", "RMT-team/babilong-1k-samples", "RMT-team/babilong-train-5k-samples")


# ---------------------------------------------------------------- official data


def _check_records(records, where: str) -> list[dict]:
    if not isinstance(records, list):
        raise DataError(f"{where}: expected a JSON array of records, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(k in r for k in ("input", "question", "target")):
            raise DataError(f"{where}: record {i} lacks one of 'input', 'question', 'target'")
        out.append({"input": str(r["input"]), "question": str(r["question"]), "target": str(r["target"])})
    return out


def _read_parquet(files: Sequence[Path]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{files[0]}: reading parquet needs pyarrow (pip install pyarrow)") from None
    rows: list[dict] = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def split_files(root: Path, task: str, length: str) -> list[Path]:
    """Files holding split `task` of config `length` in a dataset snapshot:
    data/<task>/<length>.json, else parquet files under a <length> folder
    named <task>.parquet or <task>-*.parquet."""
    js = root / "data" / task / f"{length}.json"
    if js.exists():
        return [js]
    found = []
    for p in sorted(root.rglob("*.parquet")):
        rel = p.relative_to(root).parts
        if length in rel[:-1] and (p.stem == task or p.stem.startswith(task + "-")):
            found.append(p)
    return found


def load_local(root: str | Path, task: str, length: str, samples: int | None = None) -> tuple[list[dict], dict]:
    """Records of (task, length) from a local snapshot directory, and a source
    record {kind, path, files, sha256}."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: BABILong data directory does not exist")
    files = split_files(root, task, length)
    if not files:
        raise DataError(
            f"{root}: no data for task {task} at length {length} "
            f"(expected data/{task}/{length}.json or {length}/{task}*.parquet)"
        )
    if files[0].suffix == ".json":
        try:
            raw = json.loads(files[0].read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{files[0]}: not valid JSON ({e})") from None
    else:
        raw = _read_parquet(files)
    records = _check_records(raw, str(files[0]))
    if samples is not None:
        records = records[:samples]
    source = {
        "kind": "local files",
        "path": str(root),
        "files": [str(f.relative_to(root)) for f in files],
        "sha256": files_digest(files),
    }
    rev = _snapshot_revision(root)
    if rev:
        source["revision"] = rev
    return records, source


def _snapshot_revision(root: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (.../snapshots/<sha>)."""
    if root.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", root.name):
        return root.name
    return None


def load_hub(
    repo_id: str, tasks: Sequence[str], lengths: Sequence[str], revision: str | None = None
) -> Path:
    """Downloads the files of the requested splits of a BABILong dataset
    repository (only those) and returns the local snapshot directory; its
    name is the resolved commit, recorded by `load_local`."""
    from huggingface_hub import snapshot_download

    patterns = []
    for t in tasks:
        for l in lengths:
            patterns += [f"data/{t}/{l}.json", f"{l}/{t}.parquet", f"{l}/{t}-*.parquet", f"data/{l}/{t}-*.parquet"]
    try:
        path = snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise DataError(
            f"{repo_id}: downloading from the Hugging Face hub failed ({type(e).__name__}: {e}). "
            "Pass --data PATH (a local snapshot of the dataset) or --data generate (offline, labelled regenerated)."
        ) from None
    return Path(path)


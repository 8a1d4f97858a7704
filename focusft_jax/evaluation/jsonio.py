"""JSON and JSON-lines files of the evaluation tools (UTF-8, parent folders created)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from focusft_jax.evaluation.errors import EvalError


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """One JSON object per line, written to a temporary sibling then renamed
    into place: a run stopped mid-write leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file (blank lines skipped); EvalError names the bad line."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON; NaN is refused (results must be valid JSON for other tools)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; {} when the file is absent or holds no object
    (a model directory need not have every config file). EvalError when the
    file is not valid JSON: silently ignoring it could change e.g. the EOS ids."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}

"""Results as tables: markdown tables of scores and settings, and the
results.json + results.md pair every evaluation writes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from focusft_jax.evaluation.jsonio import write_json


def fmt_cell(x: float | None, digits: int = 1) -> str:
    """A score with `digits` decimals; "-" for a missing (None or NaN) cell."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]],
    columns: Sequence[str],
    *,
    corner: str = "task",
    digits: int = 1,
) -> str:
    """A GitHub markdown table: one row per (name, {column: value})."""
    head = "| " + " | ".join([corner, *columns]) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"
    body = ["| " + " | ".join([name, *(fmt_cell(vals.get(c), digits) for c in columns)]) + " |" for name, vals in rows]
    return "\n".join([head, sep, *body])


def manifest_markdown(manifest: Mapping[str, Any]) -> str:
    """The manifest as a two-column setting | value table (nested values as JSON)."""
    lines = ["| setting | value |", "|---|---|"]
    for k, v in manifest.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False)
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """OUT/results.json and OUT/results.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "results.json", results)
    m = out / "results.md"
    m.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return j, m

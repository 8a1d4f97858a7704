"""The BABILong heatmap: accuracy per task and context size as a PNG."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence


def heatmap_figure(
    table: Mapping[str, Mapping[str, float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str | None = None,
):
    """Matplotlib figure of table[row][column] (percent): red-yellow-green
    scale fixed to 0..100, integer labels in the cells (none where missing),
    x axis "Context size", y axis "Tasks"."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    data = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            v = table.get(r, {}).get(c)
            if v is not None:
                data[i, j] = float(v)
    fig = Figure(figsize=(2.0 + 0.9 * max(len(columns), 1), 1.4 + 0.45 * max(len(rows), 1)))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{int(round(data[i, j]))}", ha="center", va="center", color="black", fontsize=9)
    ax.set_xticks(range(len(columns)), labels=list(columns))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel("Context size")
    ax.set_ylabel("Tasks")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def write_heatmap(
    path: str | os.PathLike,
    table: Mapping[str, Mapping[str, float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str | None = None,
) -> Path:
    """`heatmap_figure` saved as a PNG."""
    fig = heatmap_figure(table, rows, columns, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

"""Training logs: a JSONL metrics file and TensorBoard event files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-safe scalars and lists from numpy / jax values (non-finite: None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return [_plain(x) for x in arr]


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and writes
    scalars (and per-layer lists as `name/i`) to TensorBoard in `directory`."""

    def __init__(self, directory: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.directory = Path(directory)
        self.path = self.directory / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k == "step" or v is None:
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if x is not None:
                            self.writer.add_scalar(f"{k}/{i}", x, step)
                elif isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()

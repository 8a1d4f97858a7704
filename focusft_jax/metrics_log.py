"""Training logs: a JSONL metrics file with every logged value, and the
dashboards (TensorBoard event files, optionally Weights & Biases) with the
scalars grouped the way training dashboards show them."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from focusft_jax.errors import ConfigError

# Dashboard names of the trainer's metrics: train/ (the optimisation), attn/
# (the attention diagnostics), perf/ (throughput and token counts). A list
# (one value per inner step or per layer) becomes NAME/i.
DASHBOARD_TAGS = {
    "loss": "train/loss",
    "base_loss": "train/base_loss",
    "inner_losses": "train/inner_loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "step_skipped": "train/step_skipped",
    "skipped_steps": "train/skipped_steps",
    "inner_skipped": "train/inner_skipped_examples",
    "attn_sink_mass": "attn/sink_mass",
    "attn_context_engagement": "attn/context_engagement",
    "attn_sink_mass_mean": "attn/sink_mass_mean",
    "attn_context_engagement_mean": "attn/context_engagement_mean",
    "tokens_per_s": "perf/tokens_per_s",
    "examples": "perf/examples",
    "loss_tokens": "perf/loss_tokens",
    "dropped_tokens": "perf/dropped_tokens",
}
# Kept in metrics.jsonl only: what identifies the data (checksums, positions)
# and the run's data counts, which are not curves.
JSONL_ONLY = frozenset({
    "batch_checksum", "epoch", "data_step",
    "data_rows", "data_examples", "data_skipped_rows", "data_skipped_by_reason",
})


def _plain(value: Any) -> Any:
    """JSON-safe scalars and lists from numpy / jax values (non-finite: None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return [_plain(x) for x in arr]


def dashboard_scalars(row: dict) -> dict[str, float]:
    """The scalars of a metrics.jsonl `row` under their dashboard names
    (DASHBOARD_TAGS); JSONL_ONLY keys, `step` and missing (None) values are
    left out. A key in neither table goes under misc/ (the trainer's own
    keys are all in the tables: tests/test_train.py checks)."""
    out = {}
    for k, v in row.items():
        if k == "step" or k in JSONL_ONLY or v is None:
            continue
        tag = DASHBOARD_TAGS.get(k, f"misc/{k}")
        if isinstance(v, list):
            out.update({f"{tag}/{i}": float(x) for i, x in enumerate(v) if x is not None})
        elif isinstance(v, (int, float)):
            out[tag] = float(v)
    return out


def require_wandb() -> None:
    """logging.wandb needs the wandb package: checked before anything runs."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "logging.wandb: true needs the wandb package, which is not installed: "
            "pip install wandb (or the package's [wandb] extra), or set logging.wandb=false"
        ) from None


def start_wandb(directory: Path, project: str, name: str, config: dict):
    """A Weights & Biases run logging into `project`. Its id is kept in
    `directory/wandb_run_id`, so a resumed training continues the same run."""
    import wandb

    id_file = Path(directory) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=name or Path(directory).name, id=run_id, resume="allow",
                      config=config, dir=str(directory))


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` in
    `directory` (every value, under the trainer's names), and the step's
    dashboard scalars (dashboard_scalars) to TensorBoard and to `wandb_run`
    (a started wandb run, or None)."""

    def __init__(self, directory: str | Path, tensorboard: bool = True, enabled: bool = True, wandb_run=None):
        self.enabled = enabled
        self.directory = Path(directory)
        self.path = self.directory / "metrics.jsonl"
        self.writer = None
        self.wandb_run = wandb_run if enabled else None
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
        if self.writer is not None or self.wandb_run is not None:
            scalars = dashboard_scalars(row)
            if self.writer is not None:
                for tag, x in scalars.items():
                    self.writer.add_scalar(tag, x, step)
            if self.wandb_run is not None:
                self.wandb_run.log(scalars, step=int(step))
        return row

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()

"""focusft.json: how an exported model was trained.

The trainer's Hugging Face export writes it beside config.json (never into
config.json, which stays exactly what `transformers` reads). The evaluation
tools read it to choose their defaults (`eval.trained_defaults`): the prompt
format the model was trained on, the attention its prompts were read with,
the context it has. A model directory without the file (anyone else's model)
is evaluated with the official defaults.

Keys (format 1):
  format                  1
  written_by              "focusft-jax"
  step                    optimizer steps trained
  objective               "focusft" (num_inner_steps > 0) or "sft"
  attention               the training mask, "glm_bidir" or "causal"
  method                  every method.* setting (bilevel.FocusConfig)
  initialization          "from_scratch" (model.init) or "pretrained" (model.path)
  base_model              model.path, or null
  context_length          data.max_length: the longest training sequence
  max_position_embeddings the model's context
  data                    {"builtin": data.builtin or null, "train": data.train,
                           "packing", "chat_template": true (rows are chat
                           messages rendered with the tokenizer's template),
                           "babilong_prompt_parts": the BABILong prompt parts
                           of the training prompts ([] for the built-in
                           BABILong-format data, null when unknown)}
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from focusft_jax.errors import CheckpointError

FILENAME = "focusft.json"
FORMAT = 1
KEYS = (
    "format", "written_by", "step", "objective", "attention", "method", "initialization", "base_model",
    "context_length", "max_position_embeddings", "data",
)


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts as JSON values."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def training_record(cfg, step: int, max_position_embeddings: int) -> dict:
    """The record of a run of `cfg` (a config.Config) after `step` steps."""
    m = cfg.method
    builtin = cfg.data.builtin
    return {
        "format": FORMAT,
        "written_by": "focusft-jax",
        "step": int(step),
        "objective": "focusft" if m.num_inner_steps > 0 else "sft",
        "attention": m.attention,
        "method": _plain(m),
        "initialization": "pretrained" if cfg.model.path else "from_scratch",
        "base_model": cfg.model.path,
        "context_length": int(cfg.data.max_length),
        "max_position_embeddings": int(max_position_embeddings),
        "data": {
            "builtin": _plain(builtin),
            "train": list(cfg.data.train),
            "packing": bool(cfg.data.packing),
            "chat_template": True,
            # The built-in data's prompt is the context and the question only
            # (data.synthetic.babilong_prompt); of other data nothing is known.
            "babilong_prompt_parts": [] if builtin is not None and builtin.kind == "babilong" else None,
        },
    }


def write_training_record(model_dir: str | os.PathLike, record: dict) -> Path:
    path = Path(model_dir) / FILENAME
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_training_record(model_dir: str | os.PathLike) -> dict | None:
    """The record in `model_dir`, or None when it has none. A file that is not
    a format-1 record is a CheckpointError naming it (guessing defaults from
    a damaged record could score a model in the wrong format)."""
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: expected a focusft-jax training record of format {FORMAT}, got format {got!r}")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    return record

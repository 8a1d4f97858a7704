"""What the evaluation tools read from the model directory they evaluate
(--checkpoint: a Hugging Face directory or hub id, not a training checkpoint
of `focusft_jax.checkpoint`): the model and its tokenizer (one loader,
cached), the EOS and padding ids, the context length.

Id precedence (the same for every tool):
  EOS ids  generation_config.json `eos_token_id` (an int or a list), else
           config.json's, else the tokenizer's eos token;
  pad id   the tokenizer's pad token, else generation_config.json's
           `pad_token_id`, else config.json's, else the first EOS id, else 0.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from focusft_jax.evaluation.jsonio import read_json_object
from focusft_jax.evaluation.tokenizing import load_tokenizer

_MODEL_CACHE: dict[tuple[str, str | None], tuple[Any, Any]] = {}


def load_model(checkpoint: str | os.PathLike, dtype: str | None = None):
    """(focusft_jax HFModel, tokenizer) of a local model directory or a hub id
    (downloaded once by `focusft_jax.hf.resolve_model_dir`), cached per
    (checkpoint, dtype). The tokenizer is loaded first, so a directory without
    tokenizer files fails (EvalError) before the weights are read.

    dtype: "float32" / "bfloat16" for both parameters and compute, None for
    the checkpoint's own. Import problems raise focusft_jax's CheckpointError."""
    key = (str(checkpoint), dtype)
    if key not in _MODEL_CACHE:
        from focusft_jax.hf import load_hf, resolve_model_dir

        model_dir = resolve_model_dir(checkpoint)
        tok = load_tokenizer(model_dir)
        overrides = {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}
        _MODEL_CACHE[key] = (load_hf(model_dir, **overrides), tok)
    return _MODEL_CACHE[key]


def _ids(value) -> list[int]:
    """An id, a list of ids or None (a config's eos_token_id) as a list of ints."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


def generation_config(model) -> dict:
    """The model directory's generation_config.json ({} when there is none)."""
    src = getattr(model, "source_dir", None)
    return read_json_object(Path(src) / "generation_config.json") if src else {}


def eos_ids(model, tokenizer) -> list[int]:
    """EOS ids: generation_config.json, else config.json, else the tokenizer ([] when none says)."""
    for raw in (generation_config(model).get("eos_token_id"), model.hf_config.get("eos_token_id")):
        if _ids(raw):
            return _ids(raw)
    return _ids(getattr(tokenizer, "eos_token_id", None))


def pad_id(model, tokenizer, eos: Sequence[int]) -> int:
    """Padding id: the tokenizer's pad token, else generation_config.json's,
    else config.json's, else the first of `eos`, else 0."""
    gen = generation_config(model)
    for raw in (getattr(tokenizer, "pad_token_id", None), gen.get("pad_token_id"), model.hf_config.get("pad_token_id")):
        if _ids(raw):
            return _ids(raw)[0]
    return int(eos[0]) if eos else 0


def special_ids(model, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, padding id) of a loaded model, by the precedence above."""
    eos = eos_ids(model, tokenizer)
    return eos, pad_id(model, tokenizer, eos)


def model_max_context(checkpoint: str | os.PathLike) -> int | None:
    """max_position_embeddings of a model directory's config.json (of its
    text_config for multimodal configs); None when absent or unresolvable."""
    p = Path(checkpoint).expanduser()
    if not p.is_dir():
        try:
            from focusft_jax.hf import resolve_model_dir

            p = resolve_model_dir(checkpoint)
        except Exception:
            return None
    hf = read_json_object(p / "config.json")
    n = hf.get("text_config", hf).get("max_position_embeddings")
    return int(n) if n else None

"""Builders that turn a training config into a tokenizer, a dataset and a
model, plus the trainer's console output. Kept out of train.py so that the
script reads top to bottom."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax

from focusft_jax.config import ConfigError
from focusft_jax.data import ChatDataset, load_chat_dataset
from focusft_jax.hf import load_hf
from focusft_jax.model import ModelConfig, Params, init_params


def builtin_data_path(cfg, out: Path) -> Path | None:
    """OUTPUT_DIR/data/builtin.jsonl with `data.builtin` set, else None."""
    return None if cfg.data.builtin is None else out / "data" / "builtin.jsonl"


def builtin_data(cfg, out: Path) -> Path | None:
    """Generates the built-in synthetic data (when `data.builtin` is set) once,
    into `builtin_data_path`, so that the tokenizer is trained on and the
    dataset reads the same file through the same reader. Returns the file,
    or None without built-in data."""
    path = builtin_data_path(cfg, out)
    if path is None:
        return None
    from focusft_jax.data.synthetic import builtin_records

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for rec in builtin_records(cfg.data.builtin):
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path


def _builtin_texts(path: Path) -> list[str]:
    with open(path) as f:
        return [m["content"] for line in f for m in json.loads(line)["messages"]]


# A tokenizer directory holds at least one of these (fast tokenizer, its
# config, or a slow tokenizer's vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def build_tokenizer(cfg, out: Path, log, builtin: Path | None) -> tuple[Any, Path]:
    """The tokenizer and the directory its files live in (copied into the export).

    From model.tokenizer or model.path; for the built-in data without one, a
    byte-level BPE chat tokenizer trained on the generated data and saved in
    OUTPUT_DIR/tokenizer (from `builtin`, the file of `builtin_data`)."""
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.path
    if source is None:
        from focusft_jax.tokenizer import build_chat_tokenizer

        tok_dir = out / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            texts = _builtin_texts(builtin)
            vocab = cfg.model.init.vocab_size or 1024
            build_chat_tokenizer(texts, tok_dir, vocab_size=vocab)
            log(f"built a {vocab}-token chat tokenizer in {tok_dir}")
        return AutoTokenizer.from_pretrained(tok_dir), tok_dir
    from focusft_jax.hf import resolve_model_dir

    key = "model.tokenizer" if cfg.model.tokenizer else "model.tokenizer (unset, so model.path)"
    expected = "point model.tokenizer at a directory with tokenizer.json / tokenizer_config.json"
    try:
        tok_dir = resolve_model_dir(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: could not load a tokenizer from {source!r} ({e}); {expected}") from None
    # Without its own files, from_pretrained may still build a tokenizer from
    # a model's config.json, which then fails later as "no chat template".
    if not any((tok_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {tok_dir} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); {expected}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: could not load a tokenizer from {source!r} ({e}); {expected}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model.tokenizer: the tokenizer in {tok_dir} has no chat template; training renders chats "
            "with it. Use an instruct model's tokenizer or add a chat_template to tokenizer_config.json"
        )
    return tokenizer, tok_dir


def build_dataset(cfg, tokenizer, log, builtin: Path | None) -> ChatDataset:
    """Tokenizes the training data once: the data.train files and `builtin`
    (the file of `builtin_data`, None without built-in data)."""
    sources = list(cfg.data.train) + ([str(builtin)] if builtin is not None else [])
    # A dataset without an example is a DataError of load_chat_dataset, which says why.
    return load_chat_dataset(
        sources,
        tokenizer,
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
        on_bad_row=cfg.data.on_bad_row,
        split=cfg.data.split,
        log=log,
    )


def write_skipped_rows(out: Path, stats) -> Path:
    """OUTPUT_DIR/skipped_rows.jsonl: one {file, line | row, reason, problem}
    per training row skipped (data.on_bad_row: skip); empty when none was."""
    import json

    path = Path(out) / "skipped_rows.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in stats.skipped_rows))
    tmp.replace(path)
    return path


def data_metrics(stats) -> dict:
    """The data's counts, for the first metrics.jsonl row a run logs."""
    return {
        "data_rows": stats.rows,
        "data_examples": stats.examples,
        "data_skipped_rows": stats.skipped_total,
        "data_skipped_by_reason": dict(stats.skipped),
    }


def build_model(cfg, tokenizer, mesh=None) -> tuple[ModelConfig, Params, dict]:
    """(model config, params, HF config dict) from model.path or model.init,
    with the model section's numerics (dtypes, attention, remat) applied.
    mesh: a checkpoint is read straight into its shardings on it (each
    process reads only its devices' slices, hf.load_hf)."""
    m = cfg.model
    if m.path is not None:
        loaded = load_hf(m.path, mesh=mesh, **m.numerics())  # cast to param_dtype as it reads
        return loaded.cfg, loaded.params, loaded.hf_config
    vocab = m.init.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ConfigError(f"model.init.vocab_size ({vocab}) is smaller than the tokenizer ({len(tokenizer)} tokens)")
    model_cfg = m.init.replace(vocab_size=vocab, **m.numerics())
    params = init_params(model_cfg, jax.random.key(cfg.train.seed), std=m.init_std)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return model_cfg, params, {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------- console


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


@contextlib.contextmanager
def compiling(progress, shape: tuple, compiled: set):
    """Around a call of the jitted step with a batch of `shape`: the first
    time a shape comes, the call compiles (in the call: execution itself is
    asynchronous), so the bar reads "compiling" meanwhile, and the interval
    its rate (and so the ETA) is measured over is moved on by the compile's
    duration, keeping the ETA to step time. Yields
    a namespace whose `seconds` is the time spent compiling (0.0 for a shape
    already compiled), set when the block ends."""
    timing = SimpleNamespace(seconds=0.0)
    if shape in compiled:
        yield timing
        return
    compiled.add(shape)
    progress.set_description_str(f"train (compiling for {shape[0]} tokens)")
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - start
        if not progress.disable:  # the rate's interval (the ETA's) leaves the compile out; elapsed keeps it
            progress.last_print_t += timing.seconds
        progress.set_description_str("train", refresh=False)


def postfix(row: dict) -> dict:
    """The progress bar's fields from a metrics.jsonl row: the outer loss,
    the base model's loss (base_loss: the number to watch), the inner losses
    and throughput."""
    def fmt(x):
        return f"{x:.4f}" if x is not None else "nan"

    out = {"loss": fmt(row.get("loss"))}
    if "base_loss" in row:
        out["base_loss"] = fmt(row["base_loss"])
    inner = row.get("inner_losses") or []
    if inner:
        # "-": an inner step no example had a finite loss in (null in metrics.jsonl)
        out["inner"] = "/".join(f"{x:.3f}" if x is not None else "-" for x in inner)
    if row.get("tokens_per_s"):
        out["tok/s"] = f"{row['tokens_per_s']:.0f}"
    return out


def evaluation_command(tool: str) -> str:
    """How to start an evaluation tool ("babilong", "ruler", "generate") from
    where this package runs: `python -m eval.TOOL` in a clone (its eval/
    beside the package), the installed console script `focusft-TOOL`
    otherwise (an installed package has no eval/)."""
    clone = Path(__file__).resolve().parents[1] / "eval" / f"{tool}.py"
    return f"python -m eval.{tool}" if clone.exists() else f"focusft-{tool}"


def evaluation_of(cfg, hf_dir: Path, out: Path) -> str:
    """The command that evaluates a run's export on its own task: RULER at
    the trained row length for built-in niah data (50 samples: the tiny
    default's evaluation), else regenerated BABILong."""
    bi = cfg.data.builtin
    if bi is not None and bi.kind == "niah":
        return (f"{evaluation_command('ruler')} --checkpoint {hf_dir} --tasks {','.join(bi.tasks)} "
                f"--lengths {cfg.data.max_length} --samples 50 --batch-size 25 --out {out / 'ruler'}")
    return (f"{evaluation_command('babilong')} --checkpoint {hf_dir} --data generate --samples 20 "
            f"--batch-size 20 --out {out / 'eval'}")


def final_summary(s: dict) -> str:
    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    lines = [
        "",
        f"done: {s['step']} steps; outer loss {fmt(s['first_logged_loss'])} -> {fmt(s['final_loss'])}, "
        f"base-model loss (before the inner loop) {fmt(s['first_base_loss'])} -> {fmt(s['final_base_loss'])}"
        + (f", {s['skipped_steps']} non-finite steps skipped" if s["skipped_steps"] else ""),
        f"  data:        {s['data']}",
        f"  config:      {s['config']}",
        f"  checkpoints: {s['checkpoints']}",
        f"  HF export:   {s['hf_export']}   (load with transformers, or evaluate: the tools read its",
        "               focusft.json for the prompt format, attention and lengths of this model)",
        f"               {s['evaluate']}",
        f"  metrics:     {s['metrics']}  (TensorBoard: tensorboard --logdir {s['tensorboard']})",
    ]
    return "\n".join(lines)

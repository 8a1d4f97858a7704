"""Reusing an output directory without losing or mixing runs.

    run_dir.create(out)              # in train.py: the directory, or a ConfigError naming train.output_dir
    run_dir.prepare(cfg, out, log)   # in train.py, before config.yaml is written

Resuming (checkpoint.resume: true, and the directory has checkpoints): the
resolved config is compared key by key with the directory's config.yaml. Keys
in HARMLESS_KEYS may differ; any other change (what is trained: model, data,
method, optimizer, seed, batch) stops the run with a ConfigError naming every
changed key, old -> new, unless train.allow_config_change names it; such a
deliberate change is appended to config_history.jsonl.

Starting afresh (checkpoint.resume: false): a directory holding a previous
run (checkpoints, metrics or an export) is refused unless train.overwrite:
true, which removes the files in TRAINER_OUTPUTS (the trainer's own, never
anything else) before the run starts.
"""
from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from focusft_jax.config import Config, read_yaml_sections, to_dict
from focusft_jax.errors import ConfigError

# Keys (or whole sections, as a prefix) whose change does not change what the
# checkpoints were trained as, so a resume accepts it:
# - logging.*, checkpoint cadence and saving: only what is written and when;
# - train.max_steps / train.epochs: how long to go on (the lr schedule is laid
#   over the new total from the resumed step on);
# - train.output_dir: the same directory may be spelled another way;
# - train.allow_config_change / train.overwrite: how this start is handled;
# - train.max_consecutive_skipped: when a diverged run gives up;
# - mesh.*: checkpoints restore onto any mesh;
# - model.attention_impl / model.remat: the same function computed with
#   another memory trade-off.
# There are no evaluation settings in the training config.
HARMLESS_KEYS = (
    "logging",
    "train.max_steps",
    "train.epochs",
    "train.output_dir",
    "train.allow_config_change",
    "train.overwrite",
    "train.max_consecutive_skipped",
    "checkpoint",
    "mesh",
    "model.attention_impl",
    "model.remat",
)

# What the trainer writes in OUTPUT_DIR (train.py, job.py, this module);
# train.overwrite removes exactly these, nothing else.
TRAINER_OUTPUTS = (
    "config.yaml",
    "config_history.jsonl",
    "metrics.jsonl",
    "skipped_rows.jsonl",
    "skipped_rows.jsonl.tmp",
    "checkpoints",
    "hf",
    "tensorboard",
    "wandb",  # logging.wandb: the wandb package's own files (wandb.init(dir=OUTPUT_DIR))
    "wandb_run_id",  # and the run a resume continues
    "tokenizer",  # built from data.builtin when no tokenizer is given
    "data/builtin.jsonl",
    "data/builtin.jsonl.tmp",
)
# Their presence means a previous run trained here.
PREVIOUS_RUN = ("checkpoints", "metrics.jsonl", "hf")

_UNSET = object()


def create(out: Path) -> None:
    """Creates the output directory (and its parents); ConfigError naming
    train.output_dir when it is a file, lies under a file, or cannot be
    created or written (checked by creating and removing a file in it)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} is a file; expected a directory (or a path to create one at)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"train.output_dir: cannot create or write the directory {out} ({e.strerror or e}); "
            "expected a writable directory"
        ) from None


def checkpoint_steps(out: Path) -> list[int]:
    """The steps of the finished checkpoints in OUTPUT_DIR/checkpoints (orbax
    names a finished step's directory by the step; unfinished ones carry a
    suffix)."""
    ckpts = Path(out) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-5}} -> {"optim.lr": 1e-5}; a non-mapping is a leaf."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _UNSET
        tree = tree[part]
    return tree


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every key that differs between two configs
    as plain dicts (config.to_dict). A key the saved config lacks (written by
    an older version) counts as its default. Where one side has a whole
    section and the other a single value (model.init: null against a mapping),
    the section's key is reported once."""
    defaults = flatten(to_dict(Config()))
    old, new = flatten(saved), flatten(current)
    for k, v in defaults.items():
        clash = any(o.startswith(k + ".") or k.startswith(o + ".") for o in old)
        if k not in old and not clash:
            old[k] = v
    changes = {}
    for k in sorted(set(old) | set(new)):
        if old.get(k, _UNSET) == new.get(k, _UNSET):
            continue
        parts = k.split(".")  # the shortest prefix that is a value on either side
        key = next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in old or p in new)
        o = old[key] if key in old else _get(saved, key)
        changes[key] = (o, new[key] if key in new else _get(current, key))
    return changes


def _show(v: Any) -> str:
    return "(unset)" if v is _UNSET else json.dumps(v)


def check_resume(cfg: Config, out: Path, step: int | None) -> dict | None:
    """Compares `cfg` with OUTPUT_DIR/config.yaml before resuming from `step`.
    Raises ConfigError naming every changed key that is neither harmless nor
    in train.allow_config_change; returns the history record of the changes
    otherwise (None when nothing changed or there is no saved config)."""
    path = Path(out) / "config.yaml"
    if not path.exists():
        return None
    saved = read_yaml_sections(path)
    changes = config_changes(saved, to_dict(cfg))
    allowed = cfg.train.allow_config_change
    refused = {k: v for k, v in changes.items() if not _covered(k, HARMLESS_KEYS) and not _covered(k, allowed)}
    if refused:
        lines = "\n".join(f"  {k}: {_show(o)} -> {_show(n)}" for k, (o, n) in refused.items())
        keys = ",".join(refused)
        raise ConfigError(
            f"{out} holds checkpoints (step {step}) trained with another config; these keys changed from its "
            f"config.yaml:\n{lines}\n"
            f"to start a new run, set a new train.output_dir; to resume with the change deliberately, add "
            f"--set 'train.allow_config_change=[{keys}]' (recorded in {Path(out) / 'config_history.jsonl'})"
        )
    if not changes:
        return None

    def plain(v):
        return None if v is _UNSET else v

    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from_step": step,
        "changes": {k: {"old": plain(o), "new": plain(n)} for k, (o, n) in changes.items()
                    if not _covered(k, HARMLESS_KEYS)},
        "harmless": {k: {"old": plain(o), "new": plain(n)} for k, (o, n) in changes.items()
                     if _covered(k, HARMLESS_KEYS)},
    }
    return record


def _inputs(cfg: Config) -> list[Path]:
    """The paths the config reads from (never removed by train.overwrite)."""
    paths = [cfg.model.path, cfg.model.tokenizer, *cfg.data.train]
    return [Path(p).absolute() for p in paths if p]


def _clean(cfg: Config, out: Path, log) -> list[str]:
    inputs = _inputs(cfg)
    removed = []
    for name in TRAINER_OUTPUTS:
        p = (Path(out) / name).absolute()
        if not (p.exists() or p.is_symlink()):
            continue
        if any(p == i or p in i.parents or i in p.parents for i in inputs):
            log(f"train.overwrite: kept {p}: the config reads from it")
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(name)
    data = Path(out) / "data"
    if data.is_dir() and not any(data.iterdir()):
        data.rmdir()
    return removed


def prepare(cfg: Config, out: Path, log=print, main_process: bool = True) -> int | None:
    """Checks (and with train.overwrite cleans) OUTPUT_DIR before a run writes
    anything there. Returns the checkpoint step a resume starts from, or None.
    Only `main_process` removes or writes files; every process checks."""
    out = Path(out)
    steps = checkpoint_steps(out)
    if cfg.checkpoint.resume:
        if not steps:
            return None
        if not (out / "config.yaml").exists():
            log(f"warning: {out} has checkpoints but no config.yaml; resuming without checking the config")
            return steps[-1]
        record = check_resume(cfg, out, steps[-1])
        if record is not None and main_process:
            with open(out / "config_history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if record["changes"]:
                log(f"resuming with changed {', '.join(record['changes'])} (train.allow_config_change); "
                    f"recorded in {out / 'config_history.jsonl'}")
        return steps[-1]
    previous = [name for name in PREVIOUS_RUN if _nonempty(out / name)]
    if previous and not cfg.train.overwrite:
        raise ConfigError(
            f"{out} holds a previous run ({', '.join(previous)}) and checkpoint.resume is false: starting here "
            "would delete its newest checkpoints and mix both runs' metrics. Set a new train.output_dir, "
            "resume it (checkpoint.resume: true), or set train.overwrite: true to remove the previous run's files"
        )
    if cfg.train.overwrite and main_process:  # also a failed start's config.yaml and built tokenizer
        removed = _clean(cfg, out, log)
        if removed:
            log(f"train.overwrite: removed the previous run in {out} ({', '.join(removed)}); other files kept")
    return None


def _nonempty(p: Path) -> bool:
    if p.is_dir():
        return any(p.iterdir())
    return p.exists() and p.stat().st_size > 0

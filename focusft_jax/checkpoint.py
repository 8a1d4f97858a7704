"""Orbax training checkpoints: train state and data-loader position together.

Saved every N steps and at the end (asynchronously), the last K kept; a run
resumes from the newest complete checkpoint in its output directory, onto
whatever mesh it runs on now (arrays are restored straight into the target
shardings). Fast weights are never part of the state.

Each step carries checksums of its files: once orbax has finalized a step
(at once for a synchronous save; for an asynchronous one when `poll`, the
next `save`, `wait` or `close` sees it finished), `CHECKSUM_FILE` is written
into the step directory (atomically: a temporary file, then a rename), with
every file's relative path, size and sha256. Orbax ignores a plain file in a
step directory (it lists only subdirectories as items), and its keep policy
removes the file with the step. `restore_latest` verifies a step before it
restores it and falls back to the newest step that verifies, with one
warning line naming the damaged directories; when none verifies it raises a
CheckpointError. A step without a checksum file (killed between the save
and the checksum write) counts as incomplete and is skipped, unless no step
in the directory has one (a run saved by an older version): then the newest
is restored unverified, as before, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from focusft_jax.errors import CheckpointError

CHECKSUM_FILE = "focusft_checksums.json"
_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE
                  and not p.name.startswith(CHECKSUM_FILE))


def write_checksums(step_dir: str | Path) -> Path:
    """Writes `step_dir/CHECKSUM_FILE`: sorted relative paths, sizes and sha256
    of every file of the step (atomically: tmp file, fsync, rename)."""
    step_dir = Path(step_dir)
    files = {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in _step_files(step_dir)
    }
    target = step_dir / CHECKSUM_FILE
    tmp = step_dir / f"{CHECKSUM_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def verify_checksums(step_dir: str | Path) -> str | None:
    """None when every file listed in `step_dir/CHECKSUM_FILE` is there with
    its size and sha256; otherwise what is wrong, in a few words. (Files the
    list does not name are ignored.)"""
    step_dir = Path(step_dir)
    path = step_dir / CHECKSUM_FILE
    if not path.is_file():
        return f"no {CHECKSUM_FILE} (the save did not complete)"
    try:
        files = json.loads(path.read_text())["files"]
        listed = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKSUM_FILE} is unreadable ({type(e).__name__})"
    if not listed:
        return f"{CHECKSUM_FILE} lists no files"
    for rel, size, digest in sorted(listed):
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        actual = p.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, expected {size}"
        if _file_digest(p) != digest:
            return f"{rel} does not match its checksum"
    return None


class Checkpointer:
    """Wraps an orbax CheckpointManager over `directory`.

    Items: "state" (a pytree of arrays: params, optimizer state, counters)
    and "loader" (a small JSON dict: the data loader position).
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: list[int] = []  # saved, checksums not written yet

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (incomplete ones are ignored)."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader_state: dict, force: bool = False) -> bool:
        self.wait()  # orbax waits for the previous save here anyway; then its checksums
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)),
            force=force,
        )
        if saved:
            self._pending.append(step)
            self.poll()  # a synchronous save is finalized already
        return saved

    def poll(self) -> None:
        """Writes the checksums of saves that have finished; never blocks on a
        save in progress (cheap: call it every step)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self._write_pending()

    def _write_pending(self) -> None:
        self.manager.check_for_errors()
        pending, self._pending = self._pending, []
        if jax.process_index() != 0:
            return
        for step in pending:
            if self.step_dir(step).is_dir():  # not removed by the keep policy meanwhile
                write_checksums(self.step_dir(step))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, loader_state) of `step` as it is (unverified).
        abstract_state: a pytree of jax.ShapeDtypeStruct with the target
        shardings (the current mesh)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()),
        )
        return out["state"], out["loader"]

    def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = print):
        """(step, state, loader_state) of the newest step whose checksums verify,
        or None when the directory has no complete step. Damaged steps are
        skipped with one warning line naming them; CheckpointError when no
        step verifies."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        if not any((self.step_dir(s) / CHECKSUM_FILE).exists() for s in steps):
            step = steps[0]
            log(f"warning: the checkpoints in {self.directory} carry no checksums (saved by an older version); "
                f"restoring step {step} unverified")
            return (step, *self.restore(step, abstract_state))
        bad = []
        for step in steps:
            problem = verify_checksums(self.step_dir(step))
            if problem is None:
                if bad:
                    log(f"warning: skipped damaged checkpoint {'; '.join(bad)}; resuming from step {step}")
                return (step, *self.restore(step, abstract_state))
            bad.append(f"{self.step_dir(step)} ({problem})")
        raise CheckpointError(
            f"no checkpoint in {self.directory} verifies: {'; '.join(bad)}. Set a new train.output_dir, or "
            "checkpoint.resume: false with train.overwrite: true to start this one over"
        )

    def wait(self) -> None:
        """Blocks until the save in progress is finalized, and writes its checksums."""
        self.manager.wait_until_finished()
        if self._pending:
            self._write_pending()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

"""Orbax training checkpoints: train state and data-loader position together.

Saved every N steps and at the end (asynchronously), the last K kept; a run
resumes from the newest complete checkpoint in its output directory, onto
whatever mesh it runs on now (arrays are restored straight into the target
shardings). Fast weights are never part of the state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (incomplete ones are ignored)."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader_state: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, loader_state). abstract_state: a pytree of
        jax.ShapeDtypeStruct with the target shardings (the current mesh)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()),
        )
        return out["state"], out["loader"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

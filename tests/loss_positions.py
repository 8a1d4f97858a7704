"""Test helper: a batch with its scored positions as the loader emits them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from focusft_jax.loss import scored_positions


def with_loss_positions(batch: dict, positions: int | None) -> dict:
    """`batch` plus loss_index / loss_target / loss_weight [B, P] (P =
    `positions`, `loss.scored_positions`); None: `batch` as it is, so that
    `loss_targets` finds the positions on the device with P = S."""
    if positions is None:
        return batch
    keys = scored_positions({k: np.asarray(v) for k, v in batch.items()}, positions)
    return {**batch, **{k: jnp.asarray(v) for k, v in keys.items()}}

"""Transient LoRA fast weights (METHOD.md "Fast weights").

Fast weights live on layers start..L-1 with `start = int(L * (1 - fraction))`
and on the named projections. For a projection y = x W (+ b) with W of torch
shape (out, in): A [rank, in], B [out, rank], and y += (alpha / rank) B (A x).
They are reset every training step: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming
uniform, a = sqrt(5)) from the step's RNG, B = 0. They are never saved.

Layout, stacked like the model's layers so one `lax.scan` runs them:

    fast = {proj: {"A": [n_top, E, rank, in], "B": [n_top, E, out, rank]}}

with E the example axis (scope "per_example": every example adapts its own
memory) or without it (scope "shared": one memory for the whole batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from focusft_jax.model import PROJECTIONS, ModelConfig, Params, param_shapes

FAST_TARGETS = PROJECTIONS  # any projection of a layer may carry fast weights
SCOPES = ("per_example", "shared")


def fast_start_layer(num_layers: int, fraction: float) -> int:
    """First layer with fast weights: int(L * (1 - clamp(fraction, 0, 1)))."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    return int(num_layers * (1.0 - fraction))


def projection_dims(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in, out) of a projection, read from the model's parameter layout."""
    if name not in FAST_TARGETS:
        raise ValueError(f"fast-weight target {name!r} is not one of {FAST_TARGETS}")
    _, fan_in, fan_out = param_shapes(cfg)["layers"][name]["kernel"]
    return fan_in, fan_out


def init_fast_weights(
    cfg: ModelConfig,
    rng: jax.Array,
    *,
    num_top: int,
    targets: tuple[str, ...],
    rank: int,
    batch: int | None,
) -> Params:
    """Fresh fast weights for one step: A uniform in +-1/sqrt(in), B zero.

    batch: the example-axis size E (per-example scope), or None (shared scope).
    Every (layer, example, projection) gets its own draw of A.
    Returns the layout described in the module docstring, in float32.
    """
    lead = (num_top,) if batch is None else (num_top, batch)
    fast = {}
    for i, name in enumerate(targets):
        fan_in, fan_out = projection_dims(cfg, name)
        bound = 1.0 / jnp.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), lead + (rank, fan_in), jnp.float32, -bound, bound)
        fast[name] = {"A": a, "B": jnp.zeros(lead + (fan_out, rank), jnp.float32)}
    return fast

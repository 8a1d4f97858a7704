"""The outer optimizer: AdamW with decoupled weight decay (not on biases and
norm weights), linear warmup then cosine decay, global gradient-norm clipping."""
from __future__ import annotations

import jax
import optax

from focusft_jax.model import Params


def decay_mask(params: Params) -> Params:
    """True for the leaves that get weight decay: matrices and embeddings,
    not biases and norm scales."""

    def decays(path, _):
        return path[-1].key not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(lr: float, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 over warmup_ratio * total_steps, then cosine to
    min_lr_ratio * lr at total_steps."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    cosine = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    if warmup == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), cosine], [warmup])


def make_optimizer(
    params: Params,
    *,
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + clipping + schedule. Returns (optimizer, schedule)."""
    schedule = lr_schedule(lr, total_steps, warmup_ratio, min_lr_ratio)
    parts = []
    if grad_clip is not None and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params))
    )
    return optax.chain(*parts), schedule

"""Masked next-token cross-entropy, computed only where the loss needs logits.

METHOD.md "Loss": logits at position t predict input_ids[t+1], weighted by
loss_mask[t+1]. Per example the loss is the mean over its weighted tokens (an
example without loss tokens contributes nothing, never a NaN); the batch loss
is the mean over the examples that have loss tokens. With a 150K vocabulary
full-sequence logits are tens of GB at 32K tokens while a response is often a
few tokens, so the hidden states are gathered at the (at most `max_positions`)
weighted positions before the LM head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from focusft_jax.model import ModelConfig, Params, final_norm, lm_logits


@struct.dataclass
class LossTargets:
    """Where the loss is taken, per example (padded to a static length P).

    index: int32 [B, P] positions t whose logits are scored;
    target: int32 [B, P] the token at t + 1;
    weight: float32 [B, P] 1 for real entries, 0 for padding;
    dropped: int32 [] weighted tokens that did not fit in P (0 when P is large
        enough; reported so that a too-small P is never silent).
    """

    index: jax.Array
    target: jax.Array
    weight: jax.Array
    dropped: jax.Array


def token_weights(batch: dict) -> jax.Array:
    """[B, S] float weight of the prediction made at each position t:
    loss_mask[t+1] on real tokens of the same packed example."""
    lm = batch["loss_mask"].astype(bool)
    real = batch["attention_mask"].astype(bool)
    nxt_lm = jnp.pad(lm[:, 1:], ((0, 0), (0, 1)))
    nxt_real = jnp.pad(real[:, 1:], ((0, 0), (0, 1)))
    w = nxt_lm & nxt_real & real
    if batch.get("segment_ids") is not None:
        seg = batch["segment_ids"]
        w = w & (jnp.pad(seg[:, 1:], ((0, 0), (0, 1)), constant_values=-1) == seg)
    return w.astype(jnp.float32)


def loss_targets(batch: dict, max_positions: int | None = None) -> LossTargets:
    """Gathers the scored positions of `batch` into a static [B, P] layout.

    max_positions: P; None means S (always enough). The data pipeline knows
    the largest response length and passes a bucketed P.
    """
    ids = batch["input_ids"]
    bsz, seq = ids.shape
    p = seq if max_positions is None else min(int(max_positions), seq)
    w = token_weights(batch)

    def one(wr):
        (idx,) = jnp.nonzero(wr > 0, size=p, fill_value=0)
        return idx.astype(jnp.int32)

    index = jax.vmap(one)(w)
    weight = jnp.take_along_axis(w, index, axis=1)
    # nonzero pads with index 0; zero those entries' weight unless 0 is real.
    count = jnp.sum(w > 0, axis=1)
    weight = weight * (jnp.arange(p)[None, :] < count[:, None])
    nxt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    target = jnp.take_along_axis(nxt, index, axis=1).astype(jnp.int32)
    dropped = jnp.sum(jnp.maximum(count - p, 0)).astype(jnp.int32)
    return LossTargets(index=index, target=target, weight=weight, dropped=dropped)


def per_example_ce(
    cfg: ModelConfig, params: Params, hidden: jax.Array, tg: LossTargets, gathered: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy per example from last-layer hidden states.

    hidden: [B, S, D] (before the final norm), or with `gathered` the states
    at the scored positions only, [B, P, D] (a last layer run with
    `query_index=tg.index`). Returns (loss [B], has_tokens [B] bool);
    examples without tokens get loss 0.
    """
    h = hidden if gathered else jnp.take_along_axis(hidden, tg.index[..., None], axis=1)
    logits = lm_logits(cfg, params, final_norm(cfg, params, h))
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tg.target[..., None], axis=-1)[..., 0]
    ce = (logz - picked) * tg.weight
    count = jnp.sum(tg.weight, axis=1)
    has = count > 0
    return jnp.sum(ce, axis=1) / jnp.where(has, count, 1.0), has


def batch_mean(per_example: jax.Array, has_tokens: jax.Array) -> jax.Array:
    """Mean over the examples that have loss tokens (0 when none has)."""
    n = jnp.sum(has_tokens)
    return jnp.sum(jnp.where(has_tokens, per_example, 0.0)) / jnp.maximum(n, 1)

"""Masked next-token cross-entropy, computed only where the loss needs logits.

METHOD.md "Loss": logits at position t predict input_ids[t+1], weighted by
loss_mask[t+1]. Per example the loss is the mean over its weighted tokens (an
example without loss tokens contributes nothing, never a NaN); the batch loss
is the mean over the examples that have loss tokens. With a 150K vocabulary
full-sequence logits are tens of GB at 32K tokens while a response is often a
few tokens, so the hidden states are gathered at the (at most P) weighted
positions before the LM head.

P, the number of scored positions per row, is a SHAPE of the batch, not a
method setting: the host loader (`focusft_jax.data.ChatLoader`) counts the
scored positions of its global batch, rounds the count up
(`data.batching.round_loss_positions`) and emits them with `scored_positions`
as the batch keys "loss_index", "loss_target" (int32 [B, P]) and
"loss_weight" (float32 [B, P]). `loss_targets` takes them as they are, so a
jitted step retraces per (S, P) by itself and the device never searches for
the positions; a raw batch without the keys falls back to an on-device
`jnp.nonzero` with P = `max_positions` or S.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from focusft_jax.errors import DataError
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


LOSS_KEYS = ("loss_index", "loss_target", "loss_weight")


def scored_positions(arrays: dict, num_positions: int) -> dict[str, np.ndarray]:
    """The batch keys of the scored positions, computed on the host (numpy).

    arrays: numpy input_ids, attention_mask, loss_mask [B, S] (optional
    segment_ids). num_positions: P (clipped to S, as `loss_targets` does).
    Returns {"loss_index": int32 [B, P], "loss_target": int32 [B, P],
    "loss_weight": float32 [B, P]}, exactly what `loss_targets(batch, P)`
    computes on the device: the positions t with `token_weights` > 0 in
    ascending order, then padding entries with index 0 and weight 0; target
    is the token at t + 1 (at index 0 + 1 for padding entries, as the device
    gather gives). Raises DataError naming the row if a row has more scored
    positions than P: a token is never dropped silently.
    """
    ids = np.asarray(arrays["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"scored_positions: input_ids must be [B, S], got shape {ids.shape}")
    bsz, seq = ids.shape
    p = min(int(num_positions), seq)
    if p < 1:
        raise ValueError(f"scored_positions: num_positions must be >= 1, got {num_positions}")
    lm = np.asarray(arrays["loss_mask"]).astype(bool)
    real = np.asarray(arrays["attention_mask"]).astype(bool)
    w = np.zeros((bsz, seq), bool)
    w[:, :-1] = lm[:, 1:] & real[:, 1:] & real[:, :-1]
    seg = arrays.get("segment_ids")
    if seg is not None:
        seg = np.asarray(seg)
        w[:, :-1] &= seg[:, 1:] == seg[:, :-1]
    count = w.sum(axis=1)
    if count.max(initial=0) > p:
        r = int(np.argmax(count))
        raise DataError(
            f"batch row {r}",
            f"{int(count[r])} scored positions, more than the batch's P = {p} loss positions "
            f"(rows with more: {int(np.sum(count > p))} of {bsz}); raise P, never drop loss tokens",
            "too_many_loss_positions",
        )
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    index = np.zeros((bsz, p), np.int32)
    weight = (np.arange(p)[None, :] < count[:, None]).astype(np.float32)
    for r in range(bsz):
        (pos,) = np.nonzero(w[r])
        index[r, : len(pos)] = pos
    target = np.take_along_axis(nxt, index, axis=1).astype(np.int32)
    return {"loss_index": index, "loss_target": target, "loss_weight": weight}


def loss_targets(batch: dict, max_positions: int | None = None) -> LossTargets:
    """The scored positions of `batch` in a static [B, P] layout.

    A batch with the keys of `scored_positions` (the loader's batches) gives
    them as they are (dropped = 0: `scored_positions` refuses a row that does
    not fit), and max_positions is ignored. Otherwise (a raw batch) they are
    found on the device with `jnp.nonzero`, P = max_positions or S (S is
    always enough); tokens that do not fit are counted in `dropped`.
    """
    present = [k for k in LOSS_KEYS if k in batch]
    if present:
        if len(present) != len(LOSS_KEYS):
            raise ValueError(f"loss_targets: the batch has {present} but not all of {list(LOSS_KEYS)}")
        index, target, weight = (batch[k] for k in LOSS_KEYS)
        shapes = {k: tuple(batch[k].shape) for k in LOSS_KEYS}
        bsz = batch["input_ids"].shape[0]
        if len(set(shapes.values())) != 1 or len(shapes["loss_index"]) != 2 or shapes["loss_index"][0] != bsz:
            raise ValueError(f"loss_targets: the loss keys must all be [B={bsz}, P], got shapes {shapes}")
        return LossTargets(
            index=jnp.asarray(index, jnp.int32),
            target=jnp.asarray(target, jnp.int32),
            weight=jnp.asarray(weight, jnp.float32),
            dropped=jnp.zeros((), jnp.int32),
        )
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

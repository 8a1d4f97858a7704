"""Attention diagnostics of METHOD.md "Claims": sink mass and context engagement.

Both are statistics of the attention of response-token queries (loss_mask 1):
- sink mass: the average attention probability on the first `num_sink`
  token(s) of the query's example;
- context engagement: the average attention probability on context tokens
  (loss 0, real, not sink) of the query's example.
Averaged over heads and response queries, reported per layer and overall.
Only the response rows of the attention matrix are formed ([P, S] per head,
P = response tokens), never S x S.

The response queries are the tokens the loss predicts: t + 1 for the scored
positions t of `loss.loss_targets` (the batch's loss keys, or its on-device
fallback), so the scored positions are found once, by the loader. A response
token with no real predecessor in its own example (at position 0 of a row, or
the first token of a packed example) is predicted by no position, so it is
not a query here either.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from focusft_jax.attention import attention_meta
from focusft_jax.loss import loss_targets
from focusft_jax.model import ModelConfig, Params, embed, run_layers


def attention_diagnostics(
    params: Params,
    batch: dict,
    cfg: ModelConfig,
    attention: str = "glm_bidir",
    num_sink: int = 1,
    max_queries: int | None = None,
) -> dict[str, jax.Array]:
    """Per-layer sink mass and context engagement of the base model on `batch`.

    batch: input_ids, attention_mask, loss_mask [B, S] (optional segment_ids,
    positions; the loader's loss_index / loss_target / loss_weight, whose
    scored positions give the queries). max_queries: static bound on response
    tokens per row for a batch without the loss keys (default S). Returns
    {"sink_mass": [L], "context_engagement": [L], "sink_mass_mean": [],
    "context_engagement_mean": []} (float32).
    """
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    bsz, seq = ids.shape
    meta = attention_meta(am, lm, batch.get("segment_ids"), attention)
    idx = jnp.arange(seq, dtype=jnp.int32)[None, :]
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.maximum(idx - meta.kv_start, 0)
    real = am.astype(bool)
    sink = real & (positions < num_sink)
    context = real & ~lm.astype(bool) & ~sink
    tg = loss_targets(batch, max_queries)
    q_w = (tg.weight > 0).astype(jnp.float32)
    q_idx = jnp.where(q_w > 0, tg.index + 1, 0)  # the predicted token; padding entries at 0, weight 0
    q_start = jnp.take_along_axis(meta.kv_start, q_idx, axis=1)
    q_end = jnp.take_along_axis(meta.kv_end, q_idx, axis=1)
    n_queries = jnp.maximum(jnp.sum(q_w), 1.0)

    def probe(q, k, _meta):
        # q [B,S,Hq,hd] -> response rows [B,P,Hq,hd]; probabilities [B,Hkv,G,P,T].
        qs = jnp.take_along_axis(q, q_idx[:, :, None, None], axis=1)
        hkv = k.shape[2]
        qs = qs.reshape(bsz, qs.shape[1], hkv, -1, qs.shape[-1])
        s = jnp.einsum("bpkgd,btkd->bkgpt", qs, k, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
        j = jnp.arange(k.shape[1])
        visible = (j >= q_start[..., None]) & (j < q_end[..., None])
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(visible[:, None, None], p, 0.0)
        heads = p.shape[1] * p.shape[2]

        def mass(keys):
            per_query = jnp.sum(jnp.where(keys[:, None, None, None, :], p, 0.0), axis=(1, 2, 4)) / heads
            return jnp.sum(per_query * q_w) / n_queries

        return mass(sink), mass(context)

    x = embed(cfg, params, ids)
    _, (sink_mass, engagement) = run_layers(cfg, params["layers"], x, positions, meta, probe=probe)
    return {
        "sink_mass": sink_mass,
        "context_engagement": engagement,
        "sink_mass_mean": jnp.mean(sink_mass),
        "context_engagement_mean": jnp.mean(engagement),
    }

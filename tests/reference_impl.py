"""A slow, literal reference of METHOD.md's FocuSFT step, written without the
library's attention, loss, model or bilevel code.

Everything here works on ONE example at a time ([S] token rows, [S, S] masks)
and loops in Python: over (i, j) to build the mask, over layers in the forward,
over examples for the per-example fast weights, over tensors for the clip. The
whole model (bottom layers included) is recomputed in every inner step. Python
`if` statements on loss / norm values are fine: the reference runs eagerly,
and JAX differentiates through Python control flow outside `jit`.

Parameters use the library's layout (HF names, kernels (in, out), layers
stacked on axis 0) so that gradients can be compared leaf by leaf; fast
weights of one example are {proj: {"A": [n_top, rank, in], "B": [n_top, out, rank]}}.
Only the default RoPE is supported (the test models use it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------- mask


def turns_of(attention_mask, loss_mask) -> list[int | None]:
    """Turn index of every token: maximal runs of equal loss_mask among the
    real tokens, numbered 0.. left to right; None on padding."""
    turns, current, prev = [], -1, None
    for real, lm in zip(attention_mask, loss_mask):
        if not real:
            turns.append(None)
            prev = None
            continue
        if prev is None or lm != prev:
            current += 1
        turns.append(current)
        prev = lm
    return turns


def glm_bidir_mask(attention_mask, loss_mask) -> np.ndarray:
    """[S, S] boolean, True where query i may attend to key j (METHOD.md rule).
    Padding queries (whose outputs are never used) see only themselves so that
    no softmax row is empty."""
    am = [int(v) for v in np.asarray(attention_mask)]
    lm = [int(v) for v in np.asarray(loss_mask)]
    turn = turns_of(am, lm)
    s = len(am)
    mask = np.zeros((s, s), bool)
    for i in range(s):
        if not am[i]:
            mask[i, i] = True
            continue
        for j in range(s):
            if not am[j]:
                continue
            if turn[j] < turn[i]:
                mask[i, j] = True
            elif turn[j] == turn[i] and lm[i] == 0:
                mask[i, j] = True
            elif turn[j] == turn[i] and lm[i] == 1 and j <= i:
                mask[i, j] = True
    return mask


def causal_mask(attention_mask, loss_mask=None) -> np.ndarray:
    """[S, S] plain causal mask over real tokens (padding queries see themselves)."""
    am = [int(v) for v in np.asarray(attention_mask)]
    s = len(am)
    mask = np.zeros((s, s), bool)
    for i in range(s):
        if not am[i]:
            mask[i, i] = True
            continue
        for j in range(i + 1):
            mask[i, j] = bool(am[j])
    return mask


MASKS = {"glm_bidir": glm_bidir_mask, "causal": causal_mask}

# ---------------------------------------------------------------- model


def rms_norm(x, w, eps):
    return w * (x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def lora_linear(x, p, fast=None, scale=1.0):
    """y = x W + b + (alpha/rank) (x A^T) B^T, W stored (in, out)."""
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    if fast is not None:
        a, b = fast
        y = y + scale * ((x @ a.T) @ b.T)
    return y


def rope(x, positions, theta):
    """Rotate-half RoPE of x [S, H, hd] at integer positions [S]."""
    hd = x.shape[-1]
    inv = jnp.asarray(1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)), jnp.float32)
    ang = jnp.asarray(positions, jnp.float32)[:, None] * inv[None, :]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, None, :]
    half = hd // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def at(t, l):
    """t[l] for a Python int l (as a dynamic index, so that eager JAX compiles
    one slice per shape rather than one per layer)."""
    return jax.lax.dynamic_index_in_dim(t, jnp.int32(l), keepdims=False)


def layer_params(params, l):
    return jax.tree.map(lambda t: at(t, l), params["layers"])


def decoder_layer(cfg, lp, x, positions, mask, fast_l, scale):
    """One pre-norm decoder layer on x [S, D]. fast_l: {proj: (A, B)} for the
    projections of this layer that carry fast weights (may be empty)."""
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s = x.shape[0]

    def proj(name, h):
        return lora_linear(h, lp[name], fast_l.get(name), scale)

    h = rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q = proj("q_proj", h).reshape(s, hq, hd)
    k = proj("k_proj", h).reshape(s, hkv, hd)
    v = proj("v_proj", h).reshape(s, hkv, hd)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"]["scale"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"]["scale"], cfg.rms_norm_eps)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    # GQA: query head h reads kv head h // (hq // hkv) (transformers' repeat_kv)
    k, v = jnp.repeat(k, hq // hkv, axis=1), jnp.repeat(v, hq // hkv, axis=1)
    sc = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    sc = jnp.where(mask[None], sc, -jnp.inf)
    p = jax.nn.softmax(sc, axis=-1)
    attn = jnp.einsum("hqk,khd->qhd", p, v).reshape(s, hq * hd)
    x = x + proj("o_proj", attn)
    h = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    x = x + proj("down_proj", jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h))
    return x


def hidden_one(cfg, params, ids, positions, mask, fast=None, start=None, scale=1.0):
    """Last-layer hidden states [S, D] of one example (before the final norm);
    `fast` (one example's fast weights) applies to layers start..L-1. All
    layers are computed, every time."""
    assert cfg.rope_type == "default"
    x = params["embed_tokens"]["embedding"][ids]
    for l in range(cfg.num_layers):
        fast_l = {}
        if fast is not None and l >= start:
            fast_l = {name: (at(ab["A"], l - start), at(ab["B"], l - start)) for name, ab in fast.items()}
        x = decoder_layer(cfg, layer_params(params, l), x, positions, mask, fast_l, float(scale))
    return x


# ---------------------------------------------------------------- loss


def ce_weights(attention_mask, loss_mask) -> np.ndarray:
    """Weight of the prediction at position t (of token t+1): loss_mask[t+1],
    when tokens t and t+1 are both real."""
    s = len(attention_mask)
    w = np.zeros(s, np.float32)
    for t in range(s - 1):
        if attention_mask[t] and attention_mask[t + 1] and loss_mask[t + 1]:
            w[t] = 1.0
    return w


def _ce_head(cfg, params, x, ids, w):
    """sum_t w[t] * (-log p(ids[t+1] | ..t)) / sum_t w[t] from last-layer
    hidden states x [S, D] (final norm, full logits)."""
    x = rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps)
    head = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    logits = x @ head
    nxt = jnp.concatenate([ids[1:], ids[:1]])  # the wrapped last entry has weight 0
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, nxt[:, None], axis=-1)[:, 0]
    return jnp.sum(w * nll) / jnp.sum(w)


def example_ce(cfg, params, ex, fast=None, start=None, scale=1.0):
    """Masked CE of one example (mean over its weighted tokens), or None when
    it has no loss tokens."""
    w = ce_weights(ex["attention_mask"], ex["loss_mask"])
    if w.sum() == 0:
        return None
    ids = jnp.asarray(ex["input_ids"])
    x = hidden_one(cfg, params, ids, jnp.asarray(ex["positions"]), jnp.asarray(ex["mask"]), fast, start, scale)
    return _ce_head(cfg, params, x, ids, jnp.asarray(w))


def batch_loss(per_example):
    """Mean over the examples that have loss tokens (None entries excluded)."""
    vals = [v for v in per_example if v is not None]
    return sum(vals) / len(vals) if vals else jnp.float32(0.0)


# ---------------------------------------------------------------- inner / outer


def split_examples(batch, attention="glm_bidir"):
    """Batch dict of [B, S] arrays -> list of per-example dicts with a dense mask."""
    out = []
    for e in range(np.asarray(batch["input_ids"]).shape[0]):
        am = np.asarray(batch["attention_mask"][e]).astype(int)
        lm = np.asarray(batch["loss_mask"][e]).astype(int)
        out.append(
            dict(
                input_ids=np.asarray(batch["input_ids"][e]),
                attention_mask=am,
                loss_mask=lm,
                positions=np.arange(len(am)),  # right padding: real tokens at 0..n-1
                mask=MASKS[attention](am, lm),
            )
        )
    return out


def fast_of_example(fast, e):
    return jax.tree.map(lambda t: t[:, e], fast)


def clip_and_step(phi, g, lr, c, stats):
    """Per-tensor clip (each layer's A and B on its own), then SGD."""
    new = {}
    for proj in phi:
        new[proj] = {}
        for key in ("A", "B"):
            layers = []
            for l in range(phi[proj][key].shape[0]):
                gt = at(g[proj][key], l)
                norm = jnp.sqrt(jnp.sum(gt * gt))
                if norm > c:
                    gt = gt * c / (norm + 1e-12)
                    stats["clipped"] += 1
                else:
                    stats["unclipped"] += 1
                layers.append(at(phi[proj][key], l) - lr * gt)
            new[proj][key] = jnp.stack(layers)
    return new


def inner_loop(cfg, fcfg, params, ex, phi, start, stats=None):
    """K steps of clipped SGD on one example's fast weights.
    Returns (phi_K, [inner loss at phi_{k-1}] (None: no tokens))."""
    stats = stats if stats is not None else {"clipped": 0, "unclipped": 0, "skipped": 0, "grads": []}
    scale = fcfg.alpha / fcfg.rank
    losses = []
    for _ in range(fcfg.num_inner_steps):
        if ce_weights(ex["attention_mask"], ex["loss_mask"]).sum() == 0:
            losses.append(None)
            continue
        loss, g = jax.value_and_grad(lambda p: example_ce(cfg, params, ex, p, start, scale))(phi)
        losses.append(loss)
        stats["grads"].append(g)
        if not jnp.isfinite(loss):
            stats["skipped"] += 1
            continue
        phi = clip_and_step(phi, g, fcfg.inner_lr, fcfg.inner_clip, stats)
    return phi, losses


def reference_inner(cfg, fcfg, params, batch, fast0, start, stats=None):
    """Every example adapts its own fast weights on its own loss.
    Returns (phis: per-example phi_K, inner_means [K]: mean over the examples
    with tokens and a finite loss, per-example inner loss lists)."""
    examples = split_examples(batch, fcfg.attention)
    phis, inner = [], []
    for e, ex in enumerate(examples):
        phi, losses = inner_loop(cfg, fcfg, params, ex, fast_of_example(fast0, e), start, stats)
        phis.append(phi)
        inner.append(losses)
    inner_means = []
    for k in range(fcfg.num_inner_steps):
        vals = [ls[k] for ls in inner if ls[k] is not None and bool(jnp.isfinite(ls[k]))]
        inner_means.append(sum(vals) / len(vals) if vals else float("nan"))
    return phis, inner_means, inner


def reference_outer(cfg, fcfg, params, batch, phis, start):
    """Outer loss: mean over examples with tokens of each example's CE with
    its phi_K (None entries of phis: no fast weights). Returns (loss, per_example)."""
    examples = split_examples(batch, fcfg.attention)
    scale = fcfg.alpha / fcfg.rank
    per_example = [example_ce(cfg, params, ex, phi, start, scale) for ex, phi in zip(examples, phis)]
    return batch_loss(per_example), per_example


def focusft_reference(cfg, fcfg, params, batch, fast0, start, first_order=True, stats=None):
    """The outer loss of one step, per-example scope: (loss, aux) with aux
    inner_losses [K], phis, per_example. first_order: phi_K enters the outer
    loss through stop_gradient; otherwise the gradient flows through the
    unrolled inner loop."""
    n = np.asarray(batch["input_ids"]).shape[0]
    if fcfg.num_inner_steps == 0:
        phis, inner_means = [None] * n, []
    else:
        phis, inner_means, _ = reference_inner(cfg, fcfg, params, batch, fast0, start, stats)
        if first_order:
            phis = jax.lax.stop_gradient(phis)
    loss, per_example = reference_outer(cfg, fcfg, params, batch, phis, start)
    return loss, dict(inner_losses=inner_means, phis=phis, per_example=per_example)

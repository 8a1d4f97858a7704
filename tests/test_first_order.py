"""focusft_jax/first_order.py (the memory-lean first-order step, a custom VJP
over one loop of inner steps and outer pass; also SFT) against the autodiff form of
bilevel.py (`fused_first_order=False`, itself held to the slow reference in
test_bilevel_reference.py): the same loss, aux and gradient, over the
settings that change the code path: scope, fast-weight targets (attention
projections need the lowest top layer's attention backward), number of inner
steps, remat policy, unrolled layers, tied embeddings, packing, causal mask,
blockwise attention, no bottom layers, one top layer, the last layer at the
scored positions only or everywhere, bfloat16 compute."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax.bilevel import FocusConfig, draw_fast_weights, focusft_loss
from focusft_jax.model import ModelConfig, init_params
from tests.loss_positions import with_loss_positions

CFG = ModelConfig(
    family="qwen2",
    vocab_size=53,
    hidden_size=32,
    intermediate_size=40,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
)
FCFG = FocusConfig(inner_lr=1.0, inner_clip=0.3, rank=4, alpha=8.0, fraction=0.5)
# P = 10 loss positions in the batch (< S): the last layer runs at the scored positions only
POSITIONS = 10
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
S = 24

# name: (model settings, method settings, packed[, loss positions P; None: no
# loss keys in the batch, P = S])
CASES = {
    "default": ({}, {}, False),
    "sft_glm_bidir": ({}, dict(num_inner_steps=0), False),
    "sft_causal_packed_unrolled": (dict(scan_layers=False), dict(num_inner_steps=0, attention="causal"), True),
    "all_positions": ({}, {}, False, None),
    "one_top_layer": ({}, dict(fraction=0.25), False),
    "packed": ({}, {}, True),
    "shared_all_targets_K3_tied": (
        dict(tie_word_embeddings=True),
        dict(scope="shared", targets=ALL_TARGETS, num_inner_steps=3),
        False,
    ),
    "attention_targets_only_K1": ({}, dict(targets=("q_proj", "v_proj"), num_inner_steps=1), False),
    "remat_full_unrolled": (dict(remat="full", scan_layers=False), {}, False),
    "remat_dots_causal": (dict(remat="dots"), dict(attention="causal"), False),
    "blockwise_no_bottom": (dict(attention_impl="blockwise"), dict(fraction=1.0), True),
    "bfloat16": (dict(compute_dtype="bfloat16"), {}, False),
}

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_batch(packed: bool, seed: int = 0, positions: int | None = POSITIONS) -> dict:
    """Two rows: context/answer turns, right padding in one; with `packed`,
    two conversations in the first row (segment ids, positions restarting);
    with its P = `positions` loss positions (None: none, P = S)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (2, S))
    loss = np.zeros((2, S), np.int32)
    loss[0, 7:11] = 1
    loss[0, 15:20] = 1
    loss[1, 9:16] = 1
    att = np.ones((2, S), np.int32)
    att[1, 19:] = 0
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "loss_mask": jnp.asarray(loss), "attention_mask": jnp.asarray(att)}
    if packed:
        seg = np.zeros((2, S), np.int32)
        seg[0, 12:] = 1
        batch["segment_ids"] = jnp.asarray(seg)
    return with_loss_positions(batch, positions)


@functools.partial(jax.jit, static_argnums=(3, 4), compiler_options=FAST_COMPILE)
def value_and_grad(params, batch, fast0, cfg, fcfg):
    return jax.value_and_grad(focusft_loss, has_aux=True)(params, batch, jax.random.key(0), cfg, fcfg, fast0)


@functools.partial(jax.jit, static_argnums=(3, 4), compiler_options=FAST_COMPILE)
def value(params, batch, fast0, cfg, fcfg):
    return focusft_loss(params, batch, jax.random.key(0), cfg, fcfg, fast0)


def assert_tree_close(actual, expected, rtol, what):
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        atol = rtol * max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("case", list(CASES))
def test_fused_first_order_equals_autodiff(case):
    model_kw, method_kw, packed, *positions = CASES[case]
    cfg = CFG.replace(**model_kw)
    fused = dataclasses.replace(FCFG, **method_kw)
    plain = dataclasses.replace(fused, fused_first_order=False)
    params = init_params(cfg, jax.random.key(1), std=0.2)
    batch = make_batch(packed, positions=positions[0] if positions else POSITIONS)
    fast0 = None  # SFT
    if fused.num_inner_steps:
        # B = 0 at phi_0 (METHOD); a non-zero B also makes A's gradient non-zero at step 1
        fast0 = jax.tree_util.tree_map_with_path(
            lambda p, x: 0.05 * jax.random.normal(jax.random.key(3), x.shape) if p[-1].key == "B" else x,
            draw_fast_weights(jax.random.key(2), 2, cfg, fused),
        )
    rtol = 2e-2 if cfg.compute_dtype == "bfloat16" else 1e-5

    (loss, aux), grads = value_and_grad(params, batch, fast0, cfg, fused)
    (rloss, raux), rgrads = value_and_grad(params, batch, fast0, cfg, plain)
    assert bool(jnp.isfinite(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert_tree_close(loss, rloss, rtol, "outer loss")
    assert_tree_close(aux["inner_losses"], raux["inner_losses"], rtol, "inner losses")
    assert aux["inner_losses"].shape == (fused.num_inner_steps,)
    for key in ("inner_skipped", "loss_tokens", "examples", "dropped_tokens"):
        assert np.array_equal(np.asarray(aux[key]), np.asarray(raux[key])), key
    assert jax.tree.structure(grads) == jax.tree.structure(rgrads)
    assert_tree_close(grads, rgrads, rtol, "gradient")
    # not vacuous: the inner loop moved the loss, every layer has a gradient
    if fused.num_inner_steps:
        assert abs(float(aux["inner_losses"][0] - loss)) > 1e-3
    for name, g in grads["layers"].items():
        per_layer = jnp.max(jnp.abs(jax.tree.leaves(g)[0].reshape(cfg.num_layers, -1)), axis=1)
        assert bool(jnp.all(per_layer > 0)), name

    # the forward alone (no gradient: the custom VJP's primal path)
    vloss, vaux = value(params, batch, fast0, cfg, fused)
    assert_tree_close(vloss, rloss, rtol, "value-only loss")
    assert_tree_close(vaux["inner_losses"], raux["inner_losses"], rtol, "value-only inner losses")


def test_fused_first_order_scales_with_the_cotangent():
    """The custom VJP multiplies its precomputed gradient by the incoming
    cotangent (a loss scaled by 3, or summed with another, stays exact)."""
    params = init_params(CFG, jax.random.key(1), std=0.2)
    batch = make_batch(False)
    fast0 = draw_fast_weights(jax.random.key(2), 2, CFG, FCFG)
    plain = dataclasses.replace(FCFG, fused_first_order=False)

    def scaled(p, fcfg):
        return 3.0 * focusft_loss(p, batch, jax.random.key(0), CFG, fcfg, fast0)[0]

    g = jax.jit(jax.grad(scaled, argnums=0), static_argnums=1)(params, FCFG)
    rg = jax.jit(jax.grad(scaled, argnums=0), static_argnums=1)(params, plain)
    assert_tree_close(g, rg, 1e-5, "3 x loss gradient")

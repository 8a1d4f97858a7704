"""Decoder properties beyond parity: scanned layers, remat, logical axes, fast-weight hook."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax import model as M
from focusft_jax.attention import attention_meta


def _cfg(**kw):
    base = dict(
        family="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
    )
    base.update(kw)
    return M.ModelConfig(**base)


def _inputs(cfg, batch=2, seq=12):
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    mask = jnp.ones_like(tokens)
    return tokens, M.positions_from_mask(mask), attention_meta(mask, kind="causal")


def _loss(cfg, params, tokens, pos, meta):
    return jnp.mean(M.forward(cfg, params, tokens, pos, meta) ** 2)


def test_compiled_program_does_not_grow_with_depth():
    """Layers are scanned: the HLO of an 8-layer model is as large as a 2-layer one."""

    def hlo_size(layers):
        cfg = _cfg(num_layers=layers)
        params = M.init_params(cfg, jax.random.key(0))
        tokens, pos, meta = _inputs(cfg)
        fn = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
        return len(fn.lower(cfg, params, tokens, pos, meta).as_text())

    assert hlo_size(8) < 1.05 * hlo_size(2)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_identical_gradients(remat):
    cfg = _cfg()
    params = M.init_params(cfg, jax.random.key(0))
    tokens, pos, meta = _inputs(cfg)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    g0 = grad(cfg, params, tokens, pos, meta)
    g1 = grad(cfg.replace(remat=remat), params, tokens, pos, meta)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_logical_axes_name_every_dimension():
    for cfg in (_cfg(), _cfg(family="qwen3", qkv_bias=False, qk_norm=True, tie_word_embeddings=True)):
        params = M.init_params(cfg, jax.random.key(0))
        axes = M.logical_axes(cfg)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_a = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
        assert [p for p, _ in flat_p] == [p for p, _ in flat_a]
        for (_, p), (_, a) in zip(flat_p, flat_a):
            assert len(a) == p.ndim


def test_zero_fast_weights_change_nothing_and_nonzero_ones_do():
    """The fast-weight hook: B = 0 is the identity; per-example fast weights
    act on their own example only."""
    cfg = _cfg()
    params = M.init_params(cfg, jax.random.key(0))
    tokens, pos, meta = _inputs(cfg)
    top = 2
    r, D, F = 4, cfg.hidden_size, cfg.intermediate_size
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    key = jax.random.key(3)
    fast0 = {
        n: {"A": jax.random.normal(key, (top, 2, r, i)), "B": jnp.zeros((top, 2, o, r))} for n, (i, o) in shapes.items()
    }
    base = M.forward(cfg, params, tokens, pos, meta)
    np.testing.assert_allclose(M.forward(cfg, params, tokens, pos, meta, fast0, 2.0), base, rtol=1e-6, atol=1e-6)
    # Non-zero B on example 1 only: example 0 is untouched, example 1 changes.
    fast1 = jax.tree.map(lambda x: x, fast0)
    fast1["up_proj"]["B"] = fast1["up_proj"]["B"].at[:, 1].set(0.5)
    out = M.forward(cfg, params, tokens, pos, meta, fast1, 2.0)
    np.testing.assert_allclose(out[0], base[0], rtol=1e-6, atol=1e-6)
    assert np.abs(out[1] - base[1]).max() > 1e-3


def test_invalid_config_values_are_named():
    with pytest.raises(ValueError, match="family 'gpt2'"):
        _cfg(family="gpt2")
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        _cfg(rope_type="dynamic")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _cfg(num_heads=3)


def test_sequence_beyond_sliding_window_is_refused():
    cfg = _cfg(family="mistral", qkv_bias=False, sliding_window=8)
    params = M.init_params(cfg, jax.random.key(0))
    tokens, pos, meta = _inputs(cfg, seq=12)
    with pytest.raises(ValueError, match="sliding_window"):
        M.forward(cfg, params, tokens, pos, meta)


@pytest.mark.parametrize("attention_impl", ["dense", "blockwise"])
def test_layer_at_query_positions_equals_the_full_layer_gathered(attention_impl):
    """decoder_layer(query_index=...) computes the layer only at the given
    positions (keys and values from all): the same outputs and gradients as
    the full layer gathered there, with a glm_bidir mask, left padding, fast
    weights, q/k norm, and repeated positions (the loss's padding entries)."""
    cfg = _cfg(family="qwen3", qkv_bias=False, qk_norm=True, attention_impl=attention_impl)
    params = M.init_params(cfg, jax.random.key(0), std=0.2)
    lp = jax.tree.map(lambda a: a[0], params["layers"])
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))
    attn = jnp.asarray([[1] * 12, [0] * 3 + [1] * 9])
    loss_mask = jnp.asarray([[0] * 7 + [1] * 3 + [0] * 2, [0] * 8 + [1] * 4])
    meta = attention_meta(attn, loss_mask, kind="glm_bidir")
    cos, sin = M.rope_cos_sin(cfg, M.positions_from_mask(attn))
    idx = jnp.asarray([[6, 7, 8, 0, 0], [7, 8, 9, 10, 7]], jnp.int32)
    fast = {
        "up_proj": {
            "A": jax.random.normal(jax.random.key(2), (2, 4, 32)),
            "B": jax.random.normal(jax.random.key(3), (2, 48, 4)),
        }
    }
    w = jax.random.normal(jax.random.key(4), (2, 5, 32))

    def full(lp, x, fast):
        h, _ = M.decoder_layer(cfg, lp, x, cos, sin, meta, fast, 0.5)
        return jnp.take_along_axis(h, idx[..., None], axis=1)

    def gathered(lp, x, fast):
        return M.decoder_layer(cfg, lp, x, cos, sin, meta, fast, 0.5, query_index=idx)[0]

    a, b = jax.jit(full)(lp, x, fast), jax.jit(gathered)(lp, x, fast)
    assert a.shape == b.shape == (2, 5, 32)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    ga = jax.jit(jax.grad(lambda *args: jnp.sum(full(*args) * w), argnums=(0, 1, 2)))(lp, x, fast)
    gb = jax.jit(jax.grad(lambda *args: jnp.sum(gathered(*args) * w), argnums=(0, 1, 2)))(lp, x, fast)
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(gb), jax.tree.leaves(ga)):
        scale = float(jnp.max(jnp.abs(v)))
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))

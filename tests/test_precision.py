"""Precision that keeps the updates: one AdamW step at lr 1e-5.

With bfloat16 parameters an update of ~1e-5 on a weight near 0.02 (bf16 ulp
there ~1.2e-4) rounds away, so most entries do not move. float32 master
parameters with bfloat16 compute (param_dtype float32, compute_dtype
bfloat16: `linear` casts each weight to the compute dtype) keep them, and the
AdamW moments, created like the parameters, are float32 too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from focusft_jax import model as M
from focusft_jax.attention import attention_meta
from focusft_jax.optim import make_optimizer


def _cfg(param_dtype, compute_dtype="bfloat16"):
    return M.ModelConfig(
        family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
        param_dtype=param_dtype, compute_dtype=compute_dtype,
    )


def _one_step(cfg):
    """(fraction of parameter entries changed by one step, params, opt_state)."""
    params = M.init_params(cfg, jax.random.key(0))
    # every token id appears, so every embedding row gets a gradient
    tokens = jnp.stack([jax.random.permutation(jax.random.key(i), 64) for i in range(2)])
    mask = jnp.ones_like(tokens)
    pos, meta = M.positions_from_mask(mask), attention_meta(mask, kind="causal")

    def loss(p):
        logits = M.forward(cfg, p, tokens[:, :-1], pos[:, :-1], meta_in)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    meta_in = attention_meta(mask[:, :-1], kind="causal")
    opt, _ = make_optimizer(params, lr=1e-5, total_steps=10, warmup_ratio=0.0)
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    changed = sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)))
    total = sum(a.size for a in jax.tree.leaves(params))
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)))
    return changed / total, new, state


def test_float32_master_keeps_updates_bf16_params_lose_them():
    frac_bf16, new_bf16, _ = _one_step(_cfg("bfloat16"))
    frac_master, new_master, state = _one_step(_cfg("float32"))
    print(f"changed fraction: bf16 params {frac_bf16:.3f}, float32 master + bf16 compute {frac_master:.3f}")
    assert frac_master > 0.95, frac_master
    assert frac_bf16 < 0.5 * frac_master, (frac_bf16, frac_master)
    assert {x.dtype for x in jax.tree.leaves(new_bf16)} == {jnp.dtype(jnp.bfloat16)}
    # master weights and AdamW moments stay float32
    assert {x.dtype for x in jax.tree.leaves(new_master)} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(state) if hasattr(x, "ndim") and x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}


def test_bf16_compute_is_really_bf16():
    """The master config computes in bf16: its logits differ from float32 compute."""
    c32, cbf = _cfg("float32", "float32"), _cfg("float32", "bfloat16")
    params = M.init_params(c32, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 64)
    mask = jnp.ones_like(tokens)
    pos, meta = M.positions_from_mask(mask), attention_meta(mask, kind="causal")
    a = np.asarray(M.forward(c32, params, tokens, pos, meta))
    b = np.asarray(M.forward(cbf, params, tokens, pos, meta))
    assert np.abs(a - b).max() > 1e-6
    np.testing.assert_allclose(a, b, atol=0.05)

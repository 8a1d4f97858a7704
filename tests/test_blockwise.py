"""Blockwise (flash-style) attention against the dense reference.

Every comparison is float32 with full-precision matmuls (tests/conftest.py)
and a relative tolerance of 1e-5 (max abs error / max abs reference value):
outputs, first-order gradients wrt q, k, v, and second-order gradients (grad
of a function of grad, as the "full" meta-gradient mode takes them).
"""
from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax import blockwise
from focusft_jax.attention import AttnMeta, dense_attention
from focusft_jax.blockwise import blockwise_attention

jax.config.update("jax_default_matmul_precision", "highest")

RTOL = 1e-5


# ---------------------------------------------------------------------------
# Masks, built directly as [B, S] range arrays.
# ---------------------------------------------------------------------------


def random_ranges(rng, b, s, t, empty_frac=0.15):
    """Arbitrary per-query ranges in [0, t], some of them empty."""
    a = rng.integers(0, t + 1, (b, s))
    c = rng.integers(0, t + 1, (b, s))
    start, end = np.minimum(a, c), np.maximum(a, c)
    empty = rng.random((b, s)) < empty_frac
    end = np.where(empty, start, end)
    return start.astype(np.int32), end.astype(np.int32)


def causal_ranges(b, s):
    idx = np.arange(s, dtype=np.int32)
    return np.zeros((b, s), np.int32), np.broadcast_to(idx + 1, (b, s)).copy()


def glm_bidir_ranges(rows, s):
    """rows: per batch row, a list of items, each either ("pad", n) or an
    example given as a list of (turn_length, loss) turns. A context turn
    (loss 0) sees its example up to the end of the turn (bidirectional inside
    the turn), an assistant turn (loss 1) is causal; padding sees itself."""
    start = np.zeros((len(rows), s), np.int32)
    end = np.zeros((len(rows), s), np.int32)
    for r, items in enumerate(rows):
        pos = 0
        for item in items:
            if item[0] == "pad":
                for i in range(pos, pos + item[1]):
                    start[r, i], end[r, i] = i, i + 1
                pos += item[1]
                continue
            ex_start = pos
            for length, loss in item:
                for i in range(pos, pos + length):
                    start[r, i] = ex_start
                    end[r, i] = i + 1 if loss else pos + length
                pos += length
        assert pos == s, (r, pos, s)
    return start, end


GLM_ROWS_37 = [
    # two packed examples, then right padding
    [[(5, 0), (4, 1), (6, 0), (3, 1)], [(7, 0), (5, 1)], ("pad", 7)],
    # left padding, then one example with several turns
    [("pad", 6), [(9, 0), (6, 1), (4, 0), (12, 1)]],
]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def make_qkv(seed, b, s, t, hq, hkv, d, dtype=jnp.float32):
    """Random q, k, v and a loss weight w. numpy draws them: jax.random would
    compile a sampler per shape, which costs more than the tests themselves."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape, np.float32) for shape in ((b, s, hq, d), (b, t, hkv, d), (b, t, hkv, d)))
    w = rng.standard_normal((b, s, hq, d), np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(w)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_close(xs, refs, rtol=RTOL, what=""):
    for n, (x, r) in enumerate(zip(xs, refs)):
        assert x.shape == r.shape, (what, n, x.shape, r.shape)
        err = rel_err(x, r)
        assert err <= rtol, f"{what}[{n}]: relative error {err:.3g} > {rtol}"


def attn_fn(impl, scale, **kw):
    """attn(q, k, v, start, end) for impl in {"dense", "blockwise"}. The mask
    is an argument (not a closure constant) so that one compiled function
    serves every mask of the same shape."""
    if impl == "dense":
        return lambda q, k, v, st, en: dense_attention(q, k, v, AttnMeta(st, en), scale)
    return lambda q, k, v, st, en: blockwise_attention(q, k, v, st, en, scale, **kw)


def _loss(attn, q, k, v, st, en, w):
    return jnp.sum(jnp.sin(attn(q, k, v, st, en).astype(jnp.float32)) * w)


def output_and_grads(impl, scale, **kw):
    """jit (q, k, v, st, en, w) -> (output, (dq, dk, dv)) of a nonlinear
    scalar loss of the attention output. Cached per configuration, so that
    the jit cache serves every test with the same shapes."""
    return _output_and_grads(impl, scale, tuple(sorted(kw.items())))


def second_order(impl, scale, **kw):
    """jit (q, k, v, st, en, w) -> grad wrt (q, k, v) of a function of the
    first-order gradients, the shape of a meta-gradient (an inner gradient
    step, then an outer loss). Cached like `output_and_grads`."""
    return _second_order(impl, scale, tuple(sorted(kw.items())))


@cache
def _output_and_grads(impl, scale, kw):
    attn = attn_fn(impl, scale, **dict(kw))

    def f(q, k, v, st, en, w):
        return attn(q, k, v, st, en), jax.grad(_loss, argnums=(1, 2, 3))(attn, q, k, v, st, en, w)

    return jax.jit(f)


@cache
def _second_order(impl, scale, kw):
    attn = attn_fn(impl, scale, **dict(kw))

    def outer(q, k, v, st, en, w):
        gq, gk, gv = jax.grad(_loss, argnums=(1, 2, 3))(attn, q, k, v, st, en, w)
        q2, k2, v2 = q - 0.1 * gq, k - 0.1 * gk, v - 0.1 * gv
        return jnp.sum(gq**2) + jnp.sum(jnp.cos(gk)) + _loss(attn, q2, k2, v2, st, en, w)

    return jax.jit(jax.grad(outer, argnums=(0, 1, 2)))


# (name, B, S, T, Hq, Hkv, D, block_q, block_k, ranges(rng))
CASES = [
    ("random_gqa_ragged", 2, 37, 45, 4, 2, 8, 8, 16, lambda rng: random_ranges(rng, 2, 37, 45)),
    ("random_mha_one_block", 1, 13, 11, 2, 2, 4, 64, 64, lambda rng: random_ranges(rng, 1, 13, 11)),
    ("causal_gqa", 2, 40, 40, 6, 2, 8, 8, 8, lambda rng: causal_ranges(2, 40)),
    ("causal_ragged", 1, 50, 50, 2, 1, 8, 16, 12, lambda rng: causal_ranges(1, 50)),
    ("glm_bidir_packed_padded", 2, 37, 37, 4, 1, 8, 8, 8, lambda rng: glm_bidir_ranges(GLM_ROWS_37, 37)),
]
CASE_IDS = [c[0] for c in CASES]


def setup(case, seed=0):
    """(args, kw): args = (q, k, v, start, end, w) and kw = the blockwise
    block sizes and scale of a case."""
    _, b, s, t, hq, hkv, d, bq, bk, ranges = case
    start, end = ranges(np.random.default_rng(seed))
    q, k, v, w = make_qkv(seed, b, s, t, hq, hkv, d)
    return (q, k, v, jnp.asarray(start), jnp.asarray(end), w), {"scale": d**-0.5, "block_q": bq, "block_k": bk}


def dense_and_blockwise(builder, args, scale, **kw):
    return builder("dense", scale)(*args), builder("blockwise", scale, **kw)(*args)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_first_order_match_dense(case):
    args, kw = setup(case)
    (out_ref, grads_ref), (out, grads) = dense_and_blockwise(output_and_grads, args, **kw)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_close([out], [out_ref], what="output")
    assert_close(grads, grads_ref, what="grad")


SECOND_ORDER_CASES = [CASES[0], CASES[4]]  # random ranges with empty rows + GQA + ragged; glm_bidir with padding


@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=[c[0] for c in SECOND_ORDER_CASES])
def test_second_order_matches_dense(case):
    args, kw = setup(case, seed=1)
    ref, got = dense_and_blockwise(second_order, args, **kw)
    assert_close(got, ref, what="grad of grad")
    # The causal mask of the same shape reuses the compiled functions.
    b, s = args[3].shape
    causal = tuple(jnp.asarray(x) for x in causal_ranges(b, s))
    args = args[:3] + causal + args[5:]
    ref, got = dense_and_blockwise(second_order, args, **kw)
    assert_close(got, ref, what="causal grad of grad")


def test_skipping_does_not_change_results():
    args, kw = setup(CASES[4])
    out, grads = output_and_grads("blockwise", **kw)(*args)
    out_ns, grads_ns = output_and_grads("blockwise", skip_masked_blocks=False, **kw)(*args)
    assert_close([out_ns], [out], rtol=1e-6)
    assert_close(grads_ns, grads, rtol=1e-6)


def test_key_block_ranges():
    start, end = causal_ranges(1, 64)
    lo, hi = blockwise._key_block_ranges(jnp.asarray(start), jnp.asarray(end), 4, 16, 8, 8, True)
    np.testing.assert_array_equal(lo, [0, 0, 0, 0])
    np.testing.assert_array_equal(hi, [2, 4, 6, 8])  # the causal triangle: about half the blocks
    # A query block whose rows are all empty visits no key block; the empty
    # rows of a mixed block do not widen its range.
    start = np.array([[5] * 8 + [9, 20, 20, 20, 20, 20, 20, 20]], np.int32)
    end = np.array([[5] * 8 + [12, 3, 20, 20, 20, 20, 20, 20]], np.int32)
    lo, hi = blockwise._key_block_ranges(jnp.asarray(start), jnp.asarray(end), 2, 8, 3, 8, True)
    assert int(lo[0]) == int(hi[0])
    np.testing.assert_array_equal([lo[1], hi[1]], [1, 2])


def test_empty_rows_give_zeros_and_zero_finite_gradients():
    """Empty rows (start == end, start > end, a whole batch row, or every row)
    output zeros and get zero gradients; nothing is NaN, also at second order
    (the second-order comparisons above include empty rows too)."""
    # The shapes and block sizes of CASES[0], so the compiled functions of the
    # tests above are reused.
    (q, k, v, _, _, w), kw = setup(CASES[0], seed=3)
    b, s, t = q.shape[0], q.shape[1], k.shape[1]
    start, end = random_ranges(np.random.default_rng(3), b, s, t)
    start[0, :] = end[0, :] = 7  # a whole batch row of empty ranges
    start[1, 5], end[1, 5] = 9, 4  # start > end is empty too
    empty = start >= end
    args = (q, k, v, jnp.asarray(start), jnp.asarray(end), w)
    (out_ref, grads_ref), (out, grads) = dense_and_blockwise(output_and_grads, args, **kw)
    assert np.all(np.asarray(out)[empty] == 0.0)
    assert np.all(np.asarray(grads[0])[empty] == 0.0)
    assert_close([out], [out_ref], what="output")
    assert_close(grads, grads_ref, what="grad")
    # Nothing visible anywhere: zeros everywhere, including all gradients.
    none = jnp.asarray(np.zeros((b, s), np.int32))
    args = (q, k, v, none, none, w)
    out, grads = output_and_grads("blockwise", **kw)(*args)
    for x in (out,) + grads + second_order("blockwise", **kw)(*args):
        assert np.all(np.asarray(x) == 0.0)


def test_fast_backward_matches_differentiable_twin():
    """The loop backward (first-order path) and the scan/cond backward (which
    is what gets differentiated for second order) are the same function,
    including the cotangent of the log-sum-exp output."""
    b, hkv, g, sp, tp, d, bq, bk = 2, 2, 2, 24, 32, 8, 8, 8
    rng = np.random.default_rng(5)
    shapes = ((b, hkv, g, sp, d), (b, hkv, tp, d), (b, hkv, tp, d), (b, hkv, g, sp, d), (b, hkv, g, sp))
    q, k, v, do, dlse = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes)
    start, end = (jnp.asarray(x) for x in random_ranges(np.random.default_rng(5), b, sp, tp))

    @jax.jit
    def both(q, k, v, do, dlse, start, end):
        o, lse = blockwise._fwd_loops(q, k, v, start, end, 0.4, bq, bk, True)
        args = (q, k, v, o, lse, do, dlse, start, end, 0.4, bq, bk, True)
        return blockwise._bwd_loops(*args), blockwise._bwd_scan(*args)

    fast, twin = both(q, k, v, do, dlse, start, end)
    assert_close(fast, twin, rtol=1e-6, what="bwd")


def test_vmap_matches_batched_call():
    """Per-example vmap (the batch-folding custom_vmap rule) with an unbatched
    argument, forward and first order; and a vmapped second order (where the
    block skipping's lax.cond becomes a select)."""
    b, s, t, hq, hkv, d = 3, 21, 21, 4, 2, 8
    start, end = (jnp.asarray(x) for x in random_ranges(np.random.default_rng(7), b, s, t))
    q, k, v, w = make_qkv(7, b, s, t, hq, hkv, d)
    kb = jnp.broadcast_to(k[:1], k.shape)  # the same keys for every example
    scale = 0.35

    def one(q, k, v, st, en):
        return blockwise_attention(q[None], k[None], v[None], st[None], en[None], scale, block_q=8, block_k=8)[0]

    def loss_one(q, k, v, st, en, w):
        return jnp.sum(jnp.sin(one(q, k, v, st, en)) * w)

    def meta_one(q, k, v, st, en, w):
        return jnp.sum(jax.grad(loss_one)(q, k, v, st, en, w) ** 2)

    def meta_dense(q, k, v, st, en, w):
        attn = attn_fn("dense", scale)
        return jnp.sum(jax.grad(_loss, argnums=1)(attn, q, k, v, st, en, w) ** 2)

    in_axes = (0, None, 0, 0, 0, 0)

    @jax.jit
    def vmapped(q, k, v, st, en, w):
        out = jax.vmap(one, in_axes[:5])(q, k, v, st, en)
        grads = jax.vmap(jax.grad(loss_one, argnums=(0, 1, 2)), in_axes)(q, k, v, st, en, w)
        return out, grads, jax.vmap(jax.grad(meta_one), in_axes)(q, k, v, st, en, w)

    @jax.jit
    def reference(q, k, v, st, en, w):
        out, grads = output_and_grads("dense", scale)(q, k, v, st, en, w)
        return out, grads, jax.grad(meta_dense)(q, k, v, st, en, w)

    out, (gq, gk, gv), gg = vmapped(q, k[0], v, start, end, w)
    out_ref, (gq_ref, gk_ref, gv_ref), gg_ref = reference(q, kb, v, start, end, w)
    assert_close([out], [out_ref], what="vmap output")
    assert_close([gq, gk.sum(0), gv], [gq_ref, gk_ref.sum(0), gv_ref], what="vmap grad")
    assert_close([gg], [gg_ref], what="vmap grad of grad")


def test_decoding_shape_one_query_over_a_cache():
    b, t, hq, hkv, d = 2, 70, 4, 2, 8
    q, k, v, _ = make_qkv(9, b, 1, t, hq, hkv, d)
    start = jnp.array([[0], [10]], jnp.int32)  # second row: left padding of 10
    end = jnp.array([[33], [61]], jnp.int32)
    attn = {impl: jax.jit(attn_fn(impl, 0.3, block_k=16)) for impl in ("dense", "blockwise")}
    assert_close([attn["blockwise"](q, k, v, start, end)], [attn["dense"](q, k, v, start, end)], what="decode")


def test_bfloat16_runs_and_is_close_to_float32():
    args, kw = setup(CASES[4])
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in args[:3])
    f = output_and_grads("blockwise", **kw)
    out16, grads16 = f(q16, k16, v16, *args[3:])
    out32, grads32 = f(*(x.astype(jnp.float32) for x in (q16, k16, v16)), *args[3:])
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16.astype(jnp.float32), out32) < 2e-2
    for a, r in zip(grads16, grads32):
        assert a.dtype == jnp.bfloat16
        assert rel_err(a.astype(jnp.float32), r) < 5e-2

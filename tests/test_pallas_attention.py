"""Pallas flash attention against the dense reference.

On CPU the kernels run in Pallas' interpret mode (slow), so the sizes are
tiny: D <= 32, S <= 48 for the Triton (GPU) kernels; for the Mosaic (TPU)
kernels, whose blocks are multiples of 128, S <= 200 (a few blocks). Comparisons are float32 with full-precision matmuls
(tests/conftest.py) at 1e-5 relative (max abs error / max abs reference):
outputs, dq, dk, dv, and second-order gradients; bfloat16 at a bfloat16
tolerance. The masks come from `attention_meta` (glm_bidir, causal, packed
segments, left and right padding) or are arbitrary ranges with empty rows.
"""
from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from focusft_jax import attention as A
from focusft_jax import model as M
from focusft_jax import pallas_attention as PA
from focusft_jax.attention import AttnMeta, attention_meta, dense_attention
from focusft_jax.pallas_attention import pallas_attention
from tests.test_blockwise import assert_close, make_qkv, random_ranges, rel_err

jax.config.update("jax_default_matmul_precision", "highest")


def meta_ranges(rng, b, s, kind):
    """kv_start, kv_end [B, S] from `attention_meta` of a random batch: row 0
    is right-padded and packs two examples (segment ids), row 1 is
    left-padded; turns of random lengths alternate loss 0 / 1."""
    attn = np.ones((b, s), np.int32)
    seg = np.zeros((b, s), np.int32)
    loss = np.zeros((b, s), np.int32)
    for r in range(b):
        pad = int(rng.integers(3, s // 4))
        if r % 2 == 0:
            attn[r, s - pad:] = 0
            cut = int(rng.integers(s // 4, s // 2))
            seg[r, cut:] = 1
        else:
            attn[r, :pad] = 0
        pos, lm = 0, 0
        while pos < s:
            n = int(rng.integers(2, 9))
            loss[r, pos:pos + n] = lm
            pos, lm = pos + n, 1 - lm
    meta = attention_meta(jnp.asarray(attn), jnp.asarray(loss), jnp.asarray(seg), kind=kind)
    return np.asarray(meta.kv_start), np.asarray(meta.kv_end)


def _loss(attn, q, k, v, st, en, w):
    return jnp.sum(jnp.sin(attn(q, k, v, st, en).astype(jnp.float32)) * w)


def _attn(impl, scale, bq, bk):
    """impl: "dense"; "pallas" (the default kernels: on CPU the Triton ones,
    interpreted); "mosaic" (the TPU kernels in Pallas' TPU interpreter, which
    fills uninitialised memory with NaN and performs the copies the index
    maps ask for, so a block read before it is written or a wrong clamp
    shows); "mosaic_generic" (the TPU kernels in Pallas' generic
    interpreter: about twice as fast, used where the dtype or the derivative
    order is what is tested)."""
    if impl == "dense":
        return lambda q, k, v, st, en: dense_attention(q, k, v, AttnMeta(st, en), scale)
    if impl.startswith("mosaic"):
        interpret = True if impl == "mosaic_generic" else pltpu.InterpretParams()
        return lambda q, k, v, st, en: pallas_attention(
            q, k, v, st, en, scale, block_q=bq, block_k=bk, kernels="mosaic", interpret=interpret
        )
    return lambda q, k, v, st, en: pallas_attention(q, k, v, st, en, scale, block_q=bq, block_k=bk)


@cache
def output_and_grads(impl, scale, bq=None, bk=None):
    """jit (q, k, v, st, en, w) -> (output, (dq, dk, dv)) of a nonlinear
    loss of the output; cached so that equal shapes compile once."""
    attn = _attn(impl, scale, bq, bk)

    def f(q, k, v, st, en, w):
        return attn(q, k, v, st, en), jax.grad(_loss, argnums=(1, 2, 3))(attn, q, k, v, st, en, w)

    return jax.jit(f)


@cache
def second_order(impl, scale, bq=None, bk=None):
    """jit grad wrt (q, k, v) of a function of the first-order gradients (an
    inner gradient step, then an outer loss: the meta-gradient's shape)."""
    attn = _attn(impl, scale, bq, bk)

    def outer(q, k, v, st, en, w):
        gq, gk, gv = jax.grad(_loss, argnums=(1, 2, 3))(attn, q, k, v, st, en, w)
        q2, k2, v2 = q - 0.1 * gq, k - 0.1 * gk, v - 0.1 * gv
        return jnp.sum(gq**2) + jnp.sum(jnp.cos(gk)) + jnp.sum(gv * gv[::-1]) + _loss(attn, q2, k2, v2, st, en, w)

    return jax.jit(jax.grad(outer, argnums=(0, 1, 2)))


# (name, B, S, T, Hq, Hkv, D, block_q, block_k, ranges(rng))
CASES = [
    ("glm_bidir_packed_padded_gqa_ragged", 2, 40, 40, 4, 2, 16, 16, 16, lambda r: meta_ranges(r, 2, 40, "glm_bidir")),
    ("causal_packed_padded_blocks_32x16", 2, 40, 40, 2, 2, 32, 32, 16, lambda r: meta_ranges(r, 2, 40, "causal")),
    # T != S, some empty rows, D = 24 (padded to 32 inside), one KV head.
    ("random_empty_rows_d24", 1, 37, 45, 4, 1, 24, 16, 32, lambda r: random_ranges(r, 1, 37, 45, empty_frac=0.2)),
    # S shorter than the block: one block of 16 (the next power of two).
    ("short_one_block", 1, 13, 11, 2, 1, 16, 64, 64, lambda r: random_ranges(r, 1, 13, 11)),
]


# The TPU (mosaic) kernels: blocks are multiples of 128, so the same kinds of
# masks at lengths that give several blocks, none of them a multiple of 128.
MOSAIC_CASES = [
    ("glm_bidir_packed_padded_gqa_ragged", 2, 200, 200, 4, 2, 16, 128, 128,
     lambda r: meta_ranges(r, 2, 200, "glm_bidir")),
    # One query block of 256 (S = 160 rounded up) over two key blocks.
    ("causal_packed_padded_blocks_256x128", 2, 160, 160, 2, 1, 32, 256, 128,
     lambda r: meta_ranges(r, 2, 160, "causal")),
    # T != S, empty rows, D = 24 (padded to 128 inside), GQA 4:1.
    ("random_empty_rows_d24", 1, 150, 300, 4, 1, 24, 128, 128, lambda r: random_ranges(r, 1, 150, 300, empty_frac=0.2)),
]


def setup(case, seed=0, dtype=jnp.float32):
    _, b, s, t, hq, hkv, d, bq, bk, ranges = case
    start, end = ranges(np.random.default_rng(seed))
    q, k, v, w = make_qkv(seed, b, s, t, hq, hkv, d, dtype)
    return (q, k, v, jnp.asarray(start), jnp.asarray(end), w), (d**-0.5, bq, bk)


# (kernels, case): the GPU family on CASES, the TPU family (its own block
# sizes) on MOSAIC_CASES, both interpreted on CPU.
FAMILY_CASES = [("pallas", c) for c in CASES] + [("mosaic", c) for c in MOSAIC_CASES]


@pytest.mark.parametrize("impl, case", FAMILY_CASES, ids=[f"{i}-{c[0]}" for i, c in FAMILY_CASES])
def test_forward_and_gradients_match_dense(impl, case):
    """Output and dq, dk, dv equal dense attention's at 1e-5; empty rows give exact zeros."""
    args, (scale, bq, bk) = setup(case)
    out_ref, grads_ref = output_and_grads("dense", scale)(*args)
    out, grads = output_and_grads(impl, scale, bq, bk)(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_close([out], [out_ref], what="output")
    assert_close(grads, grads_ref, what="grad")
    # A query with an empty range: exactly zero output and zero dq.
    empty = np.asarray(args[3] >= args[4])
    assert np.all(np.asarray(out)[empty] == 0) and np.all(np.asarray(grads[0])[empty] == 0)


# One case per family; the TPU family through the generic interpreter (faster).
FAMILY_FIRST = [("pallas", CASES[0]), ("mosaic_generic", MOSAIC_CASES[0])]


@pytest.mark.parametrize("impl, case", FAMILY_FIRST, ids=[i for i, _ in FAMILY_FIRST])
def test_bfloat16_within_bfloat16_tolerance(impl, case):
    """bf16 inputs: compared with the dense reference in float32 on the same
    (bf16-rounded) inputs; the kernels' error is no worse than dense's own bf16
    error plus a margin, and within a few bf16 epsilons."""
    args, (scale, bq, bk) = setup(case, seed=2, dtype=jnp.bfloat16)
    args32 = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args)
    out_ref, grads_ref = output_and_grads("dense", scale)(*args32)
    out16, grads16 = output_and_grads("dense", scale)(*args)
    out, grads = output_and_grads(impl, scale, bq, bk)(*args)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for got, dense16, ref in zip([out, *grads], [out16, *grads16], [out_ref, *grads_ref]):
        err, dense_err = rel_err(got, ref), rel_err(dense16, ref)
        assert err <= max(2 * dense_err, 2e-2), (err, dense_err)


@pytest.mark.parametrize("impl, case", FAMILY_FIRST, ids=[i for i, _ in FAMILY_FIRST])
def test_second_order_matches_dense(impl, case):
    """grad of a function of grad (the "full" meta-gradient) through the
    kernels (their second derivative is blockwise's `_bwd_scan` on the same
    padded arrays) equals the same through dense attention."""
    args, (scale, bq, bk) = setup(case, seed=1)
    ref = second_order("dense", scale)(*args)
    got = second_order(impl, scale, bq, bk)(*args)
    assert_close(got, ref, what="grad of grad")


def test_vmap_folds_into_the_batch():
    case = CASES[3]
    args, (scale, bq, bk) = setup(case, seed=3)
    q, k, v, st, en, _ = args
    stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v, st, en)]
    f = output_and_grads("pallas", scale, bq, bk)
    got = jax.jit(jax.vmap(lambda *a: pallas_attention(*a, scale, block_q=bq, block_k=bk)))(*stacked)
    for n in range(2):
        want = f(*(x[n] for x in stacked), args[5])[0]
        np.testing.assert_allclose(got[n], want, rtol=1e-6, atol=1e-6)


def test_block_ranges_skip_what_no_row_sees():
    """Causal, blocks 16 x 16, S = 64: query block i visits key blocks
    [0, i + 1); key block j is visited by query blocks [j, 4). With a second
    packed example from row 32 on, its query blocks start at key block 2."""
    s = 64
    causal = attention_meta(jnp.ones((1, s), jnp.int32), kind="causal")
    lo, hi = PA._key_block_ranges(causal.kv_start, causal.kv_end, 16, 16, 4)
    assert lo.tolist() == [[0, 0, 0, 0]] and hi.tolist() == [[1, 2, 3, 4]]
    qlo, qhi = PA._query_block_ranges(lo, hi, 4)
    assert qlo.tolist() == [[0, 1, 2, 3]] and qhi.tolist() == [[4, 4, 4, 4]]
    seg = jnp.asarray([[0] * 32 + [1] * 32])
    packed = attention_meta(jnp.ones((1, s), jnp.int32), segment_ids=seg, kind="causal")
    lo, hi = PA._key_block_ranges(packed.kv_start, packed.kv_end, 16, 16, 4)
    assert lo.tolist() == [[0, 0, 2, 2]] and hi.tolist() == [[1, 2, 3, 4]]
    qlo, qhi = PA._query_block_ranges(lo, hi, 4)
    assert qlo.tolist() == [[0, 1, 2, 3]] and qhi.tolist() == [[2, 2, 4, 4]]


def test_block_sizes_must_be_powers_of_two():
    """Triton blocks: powers of two >= 16; Mosaic blocks: multiples of 128;
    the family name is checked."""
    q = jnp.zeros((1, 8, 1, 16))
    st = jnp.zeros((1, 8), jnp.int32)
    for bad in (24, 8):
        with pytest.raises(ValueError, match="power of two"):
            pallas_attention(q, q, q, st, st + 1, 1.0, block_q=bad)
    for bad in (64, 192 + 8):
        with pytest.raises(ValueError, match="multiple of 128"):
            pallas_attention(q, q, q, st, st + 1, 1.0, block_k=bad, kernels="mosaic")
    with pytest.raises(ValueError, match="kernels must be one of"):
        pallas_attention(q, q, q, st, st + 1, 1.0, kernels="cuda")


def test_lowers_to_triton_for_cuda():
    """The forward and the backward kernels lower for a CUDA target from
    this CPU host (jax.export; the Triton custom call is not covered by
    export's compatibility guarantee, hence the disabled check)."""
    b, s, hq, hkv, d = 2, 40, 4, 2, 32
    shapes = [
        jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
    ]

    def loss(q, k, v, st, en):
        o = pallas_attention(q, k, v, st, en, d**-0.5, block_q=32, block_k=32, interpret=False)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*shapes)
    # forward, dq and dk/dv kernels
    assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3


def test_auto_is_pallas_on_gpu_and_tpu():
    """attention_impl "auto" traces to the Pallas kernels on a GPU or TPU
    backend and to blockwise (no pallas_call) elsewhere, here on CPU in CI."""
    q = jnp.zeros((1, 8, 2, 16))
    meta = attention_meta(jnp.ones((1, 8), jnp.int32), kind="causal")
    auto = str(jax.make_jaxpr(lambda q: A.attend(q, q, q, meta, 1.0, "auto"))(q))
    pallas = str(jax.make_jaxpr(lambda q: A.attend(q, q, q, meta, 1.0, "pallas"))(q))
    assert "pallas_call" in pallas
    assert ("pallas_call" in auto) == (jax.default_backend() in ("gpu", "tpu"))
    assert set(A.ATTENTION_IMPLS) == {"dense", "blockwise", "pallas", "auto"}


def test_model_loss_and_gradients_match_dense():
    """A tiny Qwen2-style decoder (GQA, head_dim 8, padded to 16 in the
    kernels) with a glm_bidir mask over a packed, right-padded row and a
    left-padded row: the loss and every parameter gradient with
    attention_impl="pallas" equal those with "dense"."""
    cfg = M.ModelConfig(
        family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
    )
    params = M.init_params(cfg, jax.random.key(0), std=0.2)
    s = 24
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, s)), jnp.int32)
    attn = jnp.asarray([[1] * 20 + [0] * 4, [0] * 5 + [1] * 19])
    seg = jnp.asarray([[0] * 11 + [1] * 13, [0] * s])
    loss_mask = jnp.asarray([[0] * 6 + [1] * 5 + [0] * 4 + [1] * 9, [0] * 12 + [1] * 4 + [0] * 3 + [1] * 5])
    meta = attention_meta(attn, loss_mask, seg, kind="glm_bidir")
    pos = M.positions_from_mask(attn)
    targets = jnp.roll(tokens, -1, axis=1)
    weight = (loss_mask * attn).astype(jnp.float32)

    def loss(cfg, params):
        logits = M.forward(cfg, params, tokens, pos, meta)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weight) / jnp.sum(weight)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    l_ref, g_ref = grad(cfg.replace(attention_impl="dense"), params)
    l_pal, g_pal = grad(cfg.replace(attention_impl="pallas"), params)
    assert abs(float(l_pal) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_pal), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_mosaic_steps_visit_only_the_range():
    """`_visited`: grid steps 0 .. hi - lo - 1 load blocks lo .. hi - 1 and
    compute; later steps stay on block hi - 1 (no new copy) and do not; an
    empty range (lo == hi, even lo == n) stays on a valid block."""
    lo, hi = jnp.asarray([1, 4, 0], jnp.int32), jnp.asarray([3, 4, 0], jnp.int32)
    got = [[tuple(int(x) for x in PA._visited(lo, hi, r, st, 4)) for st in range(4)] for r in range(3)]
    assert got[0] == [(1, 1), (2, 1), (2, 0), (2, 0)]
    assert got[1] == [(3, 0)] * 4
    assert got[2] == [(0, 0)] * 4


def test_lowers_to_mosaic_for_tpu():
    """The forward and the backward (dq, dk/dv) TPU kernels lower to Mosaic
    for a TPU target from this CPU host (jax.export runs the Pallas-to-Mosaic
    lowering, including the (8, 128) block checks; Mosaic's own compilation
    happens on a TPU). S = 200 is ragged, D = 64 is padded to 128."""
    b, s, hq, hkv, d = 2, 200, 4, 2, 64
    shapes = [
        jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
    ]

    def attn(q, k, v, st, en):
        return pallas_attention(q, k, v, st, en, d**-0.5, block_q=128, block_k=128, interpret=False, kernels="mosaic")

    def loss(*a):
        return jnp.sum(attn(*a).astype(jnp.float32) ** 2)

    for f, kernels in ((attn, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
        exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*shapes)
        assert exported.mlir_module().count("stablehlo.custom_call @tpu_custom_call") == kernels

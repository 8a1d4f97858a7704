"""focusft_jax.bilevel against a slow, literal JAX reference of METHOD.md
(tests/reference_impl.py: dense masks from the turn rule, Python loops over
layers / examples / tensors, the whole model recomputed in every inner step,
explicit LoRA, clip and SGD). Nothing of the library's mask builder, loss or
model forward is used by the reference."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax.attention import attention_meta, dense_mask
from focusft_jax.bilevel import (
    FocusConfig,
    draw_fast_weights,
    focusft_loss,
    inner_adapt,
    prepare,
)
from focusft_jax.model import ModelConfig, init_params
from tests import reference_impl as R
from tests.loss_positions import with_loss_positions

CFG = ModelConfig(
    family="qwen2",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    rope_theta=10000.0,
)
# fraction 0.5 of 4 layers: layers 0, 1 are bottom (no fast weights), 2, 3 top.
# inner_clip 0.3: with these sizes the per-tensor gradient norms straddle it,
# so both branches of the clip are taken (asserted below).
FCFG = FocusConfig(num_inner_steps=2, inner_lr=1.0, inner_clip=0.3, rank=4, alpha=8.0, fraction=0.5)
# P = 9 loss positions in the library's batches (>= the 8 scored tokens of a
# row, < S): logits and the last layer at the scored positions only, as the
# trainer runs the loader's batches.
POSITIONS = 9
FULL = dataclasses.replace(FCFG, meta_gradient="full")
START = 2
N_TOP = CFG.num_layers - START
S = 20
POISON = CFG.vocab_size - 1  # token never used by the normal batches
# (loss_mask value, length) runs: context, answer, context, answer, then padding
TURNS = ([(0, 6), (1, 4), (0, 4), (1, 4)], [(0, 5), (1, 3), (0, 3), (1, 4)])


def make_params(seed=0):
    params = init_params(CFG, jax.random.key(seed), std=0.2)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    # non-trivial biases and norm scales, so their gradients are compared too
    def perturb(path, x):
        leaf = path[-1].key
        if leaf == "bias":
            return 0.1 * jax.random.normal(next(keys), x.shape)
        if leaf == "scale":
            return 1.0 + 0.1 * jax.random.normal(next(keys), x.shape)
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


def make_row(turns, rng):
    ids, lm, am = [], [], []
    for value, n in turns:
        ids += list(rng.integers(3, CFG.vocab_size - 1, n))
        lm += [value] * n
        am += [1] * n
    pad = S - len(ids)
    return ids + [0] * pad, lm + [0] * pad, am + [0] * pad


def make_batch(turn_lists=TURNS, seed=0):
    rng = np.random.default_rng(seed)
    rows = [make_row(t, rng) for t in turn_lists]
    return {
        "input_ids": jnp.asarray([r[0] for r in rows], jnp.int32),
        "loss_mask": jnp.asarray([r[1] for r in rows], jnp.int32),
        "attention_mask": jnp.asarray([r[2] for r in rows], jnp.int32),
    }


def make_fast0(num_examples, seed=0, b_std=0.0, fcfg=FCFG):
    """fast0 in the library layout {proj: {"A": [n_top, E, r, in], "B": [n_top, E, out, r]}},
    A ~ U(+-1/sqrt(in)), B = b_std * normal (METHOD: 0)."""
    D, F = CFG.hidden_size, CFG.intermediate_size
    dims = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    rng = np.random.default_rng(seed)
    fast = {}
    for name in fcfg.targets:
        fin, fout = dims[name]
        bound = 1.0 / np.sqrt(fin)
        a = rng.uniform(-bound, bound, (N_TOP, num_examples, fcfg.rank, fin))
        b = b_std * rng.standard_normal((N_TOP, num_examples, fout, fcfg.rank))
        fast[name] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    return fast


def take(tree, idx, axis):
    return jax.tree.map(lambda t: jnp.take(t, jnp.asarray(idx), axis=axis), tree)


# The library is compiled with LLVM at -O0 only to keep these tests fast
# (XLA's CPU compile dominates their run time); it changes no semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=(4, 5), compiler_options=FAST_COMPILE)
def lib_step(params, batch, rng, fast0, fcfg, with_inner):
    """One compile per (fcfg, batch shape): ((loss, aux), grads, inner) with
    inner = inner_adapt's (phi_K, inner_losses, skipped) when with_inner."""
    (loss, aux), grads = jax.value_and_grad(focusft_loss, has_aux=True)(params, batch, rng, CFG, fcfg, fast0)
    inner = None
    if with_inner:
        inner = inner_adapt(params, fast0, prepare(params, batch, CFG, fcfg), CFG, fcfg)
    return (loss, aux), grads, inner


def lib(params, batch, fast0, fcfg=FCFG, with_inner=None, positions=POSITIONS):
    """The library on `batch` with its P = `positions` loss positions (None:
    none in the batch, P = S)."""
    if with_inner is None:  # phi_K is looked at for the first-order batches of two
        with_inner = fcfg.num_inner_steps > 0 and fcfg.meta_gradient == "first_order" and batch["input_ids"].shape[0] > 1
    batch = with_loss_positions(batch, positions)
    return lib_step(params, batch, jax.random.key(0), fast0, fcfg, with_inner)


def ref_value_and_grad(params, batch, fast0, fcfg, first_order, stats=None):
    """The reference's ((loss, aux), grad wrt params). first_order: phi_K is
    computed first (base weights fixed) and enters the outer loss as a
    constant (stop_gradient); otherwise jax.grad differentiates the whole
    unrolled reference."""
    if not first_order:
        fn = lambda p: R.focusft_reference(CFG, fcfg, p, batch, fast0, START, False, stats)
        return jax.value_and_grad(fn, has_aux=True)(params)
    n = batch["input_ids"].shape[0]
    phis, inner_means = [None] * n, []
    if fcfg.num_inner_steps:
        phis, inner_means, _ = R.reference_inner(CFG, fcfg, params, batch, fast0, START, stats)
    fn = lambda p: R.reference_outer(CFG, fcfg, p, batch, jax.lax.stop_gradient(phis), START)
    (loss, per_example), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return (loss, dict(inner_losses=inner_means, phis=phis, per_example=per_example)), grads


def new_stats():
    return {"clipped": 0, "unclipped": 0, "skipped": 0, "grads": []}


def assert_close(actual, expected, rtol=1e-5, what=""):
    """Leafwise: |a - e| <= rtol * |e| + rtol * max|e| (relative, with an atol
    at the scale of the leaf)."""
    la, le = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(la) == len(le), what
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for a, e, path in zip(la, le, paths):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (what, path, a.shape, e.shape)
        atol = rtol * max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- the reference itself


def test_reference_mask_rule_consequences():
    """Sanity of the reference's mask (METHOD.md's pinned consequences) and the
    library's mask against it on every real query row."""
    am = np.array([1] * 8 + [0] * 2)
    zeros, ones = np.zeros(10, int), np.array([1] * 8 + [0] * 2)
    full = R.glm_bidir_mask(am, zeros)
    assert full[:8, :8].all() and not full[:8, 8:].any()
    assert (R.glm_bidir_mask(am, ones)[:8] == R.causal_mask(am)[:8]).all()
    mixed = R.glm_bidir_mask(am, np.array([0, 0, 0, 1, 1, 0, 0, 1, 0, 0]))
    assert mixed[0, 2] and not mixed[0, 3]  # context sees its whole turn, no later turn
    assert mixed[3, :4].all() and not mixed[3, 4]  # answer turn is causal
    assert mixed[5, :7].all() and not mixed[5, 7]  # later context: earlier turns + own turn
    assert R.turns_of(am, [0, 0, 0, 1, 1, 0, 0, 1, 0, 0]) == [0, 0, 0, 1, 1, 2, 2, 3, None, None]
    # the context token before an answer never sees its target
    assert not mixed[2, 3]

    batch = make_batch()
    for kind in ("glm_bidir", "causal"):
        meta = attention_meta(batch["attention_mask"], batch["loss_mask"], None, kind)
        lib = np.asarray(dense_mask(meta, S))
        for e in range(2):
            real = np.asarray(batch["attention_mask"][e]).astype(bool)
            ref = R.MASKS[kind](np.asarray(batch["attention_mask"][e]), np.asarray(batch["loss_mask"][e]))
            assert (lib[e][real] == ref[real]).all(), kind


# ---------------------------------------------------------------- first order


@pytest.mark.parametrize("b_std,positions", [(0.0, 9), (0.05, 9), (0.05, None)], ids=["B0=0", "B0=random", "all_positions"])
def test_first_order_matches_reference(b_std, positions):
    params, batch, fast0 = make_params(), make_batch(), make_fast0(2, b_std=b_std)
    (loss, aux), grads, (phi, inner_losses, skipped) = lib(params, batch, fast0, positions=positions)
    stats = new_stats()
    (rloss, raux), rgrads = ref_value_and_grad(params, batch, fast0, FCFG, True, stats)

    # the data exercise both branches of the clip, and (B0 = 0) the zero A gradient
    assert stats["clipped"] > 0 and stats["unclipped"] > 0, stats
    assert stats["skipped"] == 0
    step1 = stats["grads"][:: FCFG.num_inner_steps]  # step 1 of each example
    for g in step1:
        for proj in g:
            assert float(jnp.max(jnp.abs(g[proj]["B"]))) > 0.0
            a_max = float(jnp.max(jnp.abs(g[proj]["A"])))
            assert (a_max == 0.0) if b_std == 0.0 else (a_max > 0.0)

    assert_close(loss, rloss, what="outer loss")
    assert_close(aux["inner_losses"], jnp.stack(raux["inner_losses"]), what="inner losses")
    assert np.asarray(aux["inner_skipped"]).tolist() == [0] * FCFG.num_inner_steps
    assert int(aux["examples"]) == 2
    assert_close(grads, rgrads, what="first-order grad")
    assert all_finite(grads)

    # phi_K per example (library layout [n_top, E, ...]) equals the reference's
    for e in range(2):
        assert_close(take(phi, e, 1), raux["phis"][e], what=f"phi_K example {e}")
    assert_close(inner_losses, aux["inner_losses"], rtol=1e-6)
    assert np.asarray(skipped).tolist() == [0] * FCFG.num_inner_steps
    # the inner loop moved phi
    assert float(jnp.max(jnp.abs(phi["down_proj"]["B"] - fast0["down_proj"]["B"]))) > 0.1


# ---------------------------------------------------------------- full meta-gradient


@pytest.mark.parametrize("b_std", [0.0, 0.05], ids=["B0=0", "B0=random"])
def test_full_meta_gradient_matches_reference(b_std):
    params, batch, fast0 = make_params(), make_batch(), make_fast0(2, b_std=b_std)
    (loss, aux), grads, _ = lib(params, batch, fast0, FULL)
    assert all_finite(grads) and bool(jnp.isfinite(loss))
    stats = new_stats()
    (rloss, raux), rgrads = ref_value_and_grad(params, batch, fast0, FULL, False, stats)
    assert stats["clipped"] > 0 and stats["unclipped"] > 0, stats
    assert all_finite(rgrads)
    assert_close(loss, rloss, what="outer loss")
    assert_close(aux["inner_losses"], jnp.stack(raux["inner_losses"]), what="inner losses")
    assert_close(grads, rgrads, what="full meta-gradient")

    # not vacuous: the second-order terms change the gradient
    _, fo, _ = lib(params, batch, fast0)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(fo)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(fo))
    assert diff > 1e-2 * scale, (diff, scale)


# ---------------------------------------------------------------- per-example scope


def test_pair_equals_two_singles():
    """A batch of two = two batches of one (the batch loss, inner losses and
    gradient are means over the examples); each example's phi_K is the one the
    reference computes for that example alone."""
    params, batch, fast0 = make_params(), make_batch(), make_fast0(2, b_std=0.0)
    (loss, aux), grads, (phi, _, _) = lib(params, batch, fast0)
    singles = [lib(params, take(batch, [e], 0), take(fast0, [e], 1)) for e in range(2)]
    (l0, a0), g0, _ = singles[0]
    (l1, a1), g1, _ = singles[1]
    assert_close(loss, (l0 + l1) / 2, what="batch loss = mean of the examples")
    assert_close(aux["inner_losses"], (a0["inner_losses"] + a1["inner_losses"]) / 2, what="inner losses")
    assert_close(grads, jax.tree.map(lambda x, y: (x + y) / 2, g0, g1), what="grad")
    exs = R.split_examples(batch)
    for e in range(2):
        rphi, rlosses = R.inner_loop(CFG, FCFG, params, exs[e], R.fast_of_example(fast0, e), START)
        assert_close(take(phi, e, 1), rphi, what=f"phi_K example {e}")
        assert_close(singles[e][0][1]["inner_losses"], jnp.stack(rlosses), what=f"inner losses example {e}")
    # and the examples really are different memories
    assert float(jnp.max(jnp.abs(phi["up_proj"]["B"][:, 0] - phi["up_proj"]["B"][:, 1]))) > 1e-2


def test_example_without_loss_tokens_contributes_nothing():
    params = make_params()
    batch, fast0 = make_batch((TURNS[0], [(0, 12)])), make_fast0(2, b_std=0.0)
    (loss, aux), grads, (phi, inner, skipped) = lib(params, batch, fast0)
    (l0, a0), g0, _ = lib(params, take(batch, [0], 0), take(fast0, [0], 1))
    exs = R.split_examples(batch)
    phi0, _ = R.inner_loop(CFG, FCFG, params, exs[0], R.fast_of_example(fast0, 0), START)
    assert bool(jnp.isfinite(loss)) and all_finite(grads) and all_finite(inner)
    assert int(aux["examples"]) == 1
    assert np.asarray(skipped).tolist() == [0] * FCFG.num_inner_steps
    assert_close(loss, l0)
    assert_close(aux["inner_losses"], a0["inner_losses"])
    assert_close(grads, g0)
    assert_close(take(phi, 0, 1), phi0)
    assert_close(take(phi, 1, 1), take(fast0, 1, 1), rtol=0.0)  # nothing to adapt to


# ---------------------------------------------------------------- non-finite inner steps


@pytest.mark.parametrize("where", ["fast_weight", "embedding"])
def test_non_finite_inner_loss_leaves_phi_unchanged(where):
    params, batch, fast0 = make_params(), make_batch(), make_fast0(2, b_std=0.0)
    if where == "fast_weight":
        # an inf in example 1's A: its LoRA branch is inf * 0 = NaN from step 1
        fast0["gate_proj"]["A"] = fast0["gate_proj"]["A"].at[1, 1, 0, 0].set(jnp.inf)
    else:
        # an inf embedding row for a token only example 1 contains
        params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[POISON].set(jnp.inf)
        batch["input_ids"] = batch["input_ids"].at[1, 3].set(POISON)

    (_, aux), _, (phi, inner, skipped) = lib(params, batch, fast0)
    for proj in phi:  # example 1 unchanged (inf included), bit for bit
        for key in ("A", "B"):
            np.testing.assert_array_equal(np.asarray(phi[proj][key][:, 1]), np.asarray(fast0[proj][key][:, 1]))
    assert np.asarray(skipped).tolist() == [1] * FCFG.num_inner_steps
    assert np.asarray(aux["inner_skipped"]).tolist() == [1] * FCFG.num_inner_steps

    # example 0 is unaffected: as if alone, finite, and as the reference says
    (_, a0), _, _ = lib(params, take(batch, [0], 0), take(fast0, [0], 1))
    assert all_finite(take(phi, 0, 1)) and all_finite(inner) and all_finite(aux["inner_losses"])
    assert_close(inner, a0["inner_losses"], what="inner losses = the finite example's")
    assert_close(aux["inner_losses"], a0["inner_losses"])
    stats = new_stats()
    phis, means, per_example = R.reference_inner(CFG, FCFG, params, batch, fast0, START, stats)
    assert not any(bool(jnp.isfinite(x)) for x in per_example[1])
    assert stats["skipped"] == FCFG.num_inner_steps
    assert_close(take(phi, 0, 1), phis[0], what="phi_K vs reference")
    assert_close(inner, jnp.stack(means), what="inner losses vs reference")


# ---------------------------------------------------------------- baselines


def test_inner_loss_with_no_finite_example_is_nan_not_zero():
    """An inner step in which no example had a finite loss is missing (NaN,
    null in metrics.jsonl), not a loss of 0; otherwise the finite examples' mean."""
    from focusft_jax.bilevel import inner_optimizer, inner_update

    phi = {"gate_proj": {"A": jnp.ones((1, 2, 2, 2)), "B": jnp.zeros((1, 2, 2, 2))}}
    opt = inner_optimizer(FCFG)
    nan = jnp.nan

    def mean(loss, has, grads=phi):
        return float(inner_update(FCFG, opt, opt.init(phi), phi, grads, jnp.asarray(loss), jnp.asarray(has))[2])

    assert np.isnan(mean([nan, jnp.inf], [True, True]))
    assert np.isnan(mean([1.0, 2.0], [False, False]))  # no example with loss tokens
    assert mean([nan, 2.0], [True, True]) == 2.0
    assert mean([1.0, 3.0], [True, True]) == 2.0


@functools.partial(jax.jit, static_argnums=(2,), compiler_options=FAST_COMPILE)
def _lib_loss(params, batch, fcfg):
    return focusft_loss(params, batch, jax.random.key(0), CFG, fcfg)


def lib_loss(params, batch, fcfg, positions=POSITIONS):
    return _lib_loss(params, with_loss_positions(batch, positions), fcfg)


def test_no_inner_steps_is_masked_sft():
    """num_inner_steps = 0 is SFT with the glm_bidir mask (loss and gradient);
    with attention "causal" as well it is plain SFT (causal-mask CE)."""
    params, batch = make_params(), make_batch()
    sft = dataclasses.replace(FCFG, num_inner_steps=0)
    (loss, aux), grads, _ = lib(params, batch, None, sft)
    (rloss, _), rgrads = ref_value_and_grad(params, batch, None, sft, True)
    assert_close(loss, rloss, what="loss")
    assert_close(grads, rgrads, what="grad")
    assert aux["inner_losses"].shape == (0,)
    # written out once more: the mean of the examples' masked CE
    ces = [R.example_ce(CFG, params, ex) for ex in R.split_examples(batch, "glm_bidir")]
    assert_close(loss, (ces[0] + ces[1]) / 2)

    plain = dataclasses.replace(sft, attention="causal")
    closs, _ = lib_loss(params, batch, plain)
    ces = [R.example_ce(CFG, params, ex) for ex in R.split_examples(batch, "causal")]
    assert_close(closs, (ces[0] + ces[1]) / 2, what="causal SFT loss")
    # the two masks really differ on this multi-turn batch
    assert abs(float(closs) - float(loss)) > 1e-3


# ---------------------------------------------------------------- phi_0


def test_draw_fast_weights_layout():
    """phi_0: per-example, per-layer A ~ U(+-1/sqrt(in)) in [n_top, E, r, in], B = 0."""
    rng = jax.random.key(7)
    fast = draw_fast_weights(rng, 2, CFG, FCFG)
    D, F = CFG.hidden_size, CFG.intermediate_size
    dims = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    assert set(fast) == set(FCFG.targets)
    for name, (fin, fout) in dims.items():
        a, b = np.asarray(fast[name]["A"]), np.asarray(fast[name]["B"])
        assert a.shape == (N_TOP, 2, FCFG.rank, fin) and b.shape == (N_TOP, 2, fout, FCFG.rank)
        assert (b == 0).all()
        bound = 1.0 / np.sqrt(fin)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert not np.allclose(a[:, 0], a[:, 1]) and not np.allclose(a[0], a[1])
    # a fresh draw for every step rng
    other = draw_fast_weights(jax.random.key(8), 2, CFG, FCFG)
    assert not np.allclose(np.asarray(other["up_proj"]["A"]), np.asarray(fast["up_proj"]["A"]))

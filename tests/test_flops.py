"""focusft_jax.flops: the analytic counts against XLA's, and their structure.

XLA's `cost_analysis()["flops"]` also counts elementwise work, so the exact
comparisons are against the matmul FLOPs of the optimised HLO (every `dot`,
2 * output size * contracted size, summed over the program), and
cost_analysis is held to a tight band on matmul-dominated shapes. All
programs unroll their layers (`scan_layers=False`: XLA counts a loop body
once) and use dense attention, whose FLOPs are those of the "dense" mask
(every pair is computed, masked or not).

Measured (jax 0.10.2, CPU): HLO matmul FLOPs equal the analytic counts
exactly for the forward, jax.grad of the forward (3x), and the fused
first_order step; cost_analysis is 0.3-1.2% above them on the
matmul-dominated shapes used here (6.5% on a tiny D=32 model).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax import flops
from focusft_jax.attention import attention_meta
from focusft_jax.bilevel import FocusConfig, draw_fast_weights, focusft_loss
from focusft_jax.loss import loss_targets
from focusft_jax.model import ModelConfig, forward, param_shapes
from tests.loss_positions import with_loss_positions


# The brief's tiny model: exact structure checks (HLO matmul FLOPs only).
TINY = ModelConfig(
    family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=False, attention_impl="dense", scan_layers=False,
)
# Matmul-dominated (head_dim 64, FFN 4x): cost_analysis within ~1% of the matmul count.
WIDE = ModelConfig(
    family="qwen2", vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True, attention_impl="dense", scan_layers=False,
)
# XLA's total over the analytic matmul count on WIDE, measured: 1.0050 (forward), 1.0057
# (forward with fast weights), 1.0058 (grad). On TINY it is 1.06-1.10 (elementwise work).
XLA_BAND = (1.0, 1.01)


# ---------------------------------------------------------------- HLO matmul FLOPs

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


def _dims(shape: str) -> list[int]:
    return [int(d) for d in re.match(r"^\w+\[([\d,]*)\]", shape).group(1).split(",") if d]


def hlo_dot_flops(text: str) -> int:
    """Sum of 2 * prod(output) * prod(contracted dims) over the dots that run
    once in the optimised HLO `text` (`compiled.as_text()`), following
    fusions and calls from the entry. A while loop must hold no dot (its
    trip count would matter), and a conditional's branches must cost the
    same (which one runs is data)."""
    comps, shapes, entry, cur = {}, {}, None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMPUTATION.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                entry = cur if line.startswith("ENTRY") else entry
        elif line.strip() == "}":
            cur = None
        elif m := _INSTRUCTION.match(line):
            name, shape, op, rest = m.groups()
            shapes[name] = shape
            comps[cur].append((name, shape, op, rest))

    def count(comp: str) -> int:
        total = 0
        for name, shape, op, rest in comps[comp]:
            if op == "dot":
                lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
                contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
                k = int(np.prod([_dims(shapes[lhs])[int(d)] for d in contracted.split(",") if d]))
                total += 2 * int(np.prod(_dims(shape))) * k
            elif op in ("fusion", "call"):
                total += sum(count(c) for c in re.findall(r"calls=%?([\w.\-]+)", rest))
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                assert count(body) == 0, f"{name}: a loop with matmuls, its FLOPs depend on the trip count"
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest).group(1)
                costs = {count(b.strip().lstrip("%")) for b in branches.split(",")}
                assert len(costs) == 1, f"{name}: branches of unequal cost {costs}"
                total += costs.pop()
            elif op == "convolution" or (op == "custom-call" and "matmul" in rest.lower()):
                raise AssertionError(f"{name}: {op} is not counted")
        return total

    return count(entry)


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return hlo_dot_flops(compiled.as_text()), float(cost["flops"])


# Jitted: one compile per shape is quicker than running these op by op.
_attention_meta = jax.jit(attention_meta, static_argnames="kind")
_loss_targets = jax.jit(loss_targets, static_argnames="max_positions")


# Inputs from numpy: every eager jax op would compile on its own, which
# costs more than the programs measured here.
_RNG = np.random.default_rng(0)


def _random_like(shapes):
    """Random float32 arrays for a pytree of shapes (values do not matter to
    FLOPs, only that nothing is a foldable constant)."""
    return jax.tree.map(
        lambda s: jnp.asarray(_RNG.normal(0.0, 0.02, s), jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def _params(cfg: ModelConfig):
    return _random_like(param_shapes(cfg))


def _fast0(cfg: ModelConfig, fcfg: FocusConfig, batch: int):
    shapes = jax.eval_shape(lambda k: draw_fast_weights(k, batch, cfg, fcfg), jax.random.key(0))
    return _random_like(jax.tree.map(lambda a: tuple(a.shape), shapes))


def _batch(cfg: ModelConfig, batch: int, seq: int, response: int) -> dict:
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq - response :] = 1
    return {
        "input_ids": jnp.asarray(_RNG.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "loss_mask": jnp.asarray(loss_mask),
    }


# ---------------------------------------------------------------- against XLA


@pytest.mark.parametrize("with_fast", [False, True])
def test_forward_matches_xla(with_fast):
    """(a) model.forward, plain or with fast weights on the top layer
    (per-example LoRA on q and the MLP): the analytic forward (layers, LoRA,
    LM head at every position) is XLA's matmul count exactly and its total
    within 1%."""
    cfg, B, S = WIDE, 1, 16
    fcfg = FocusConfig(rank=8, fraction=0.5, targets=("q_proj", "gate_proj", "down_proj"))
    params = _params(cfg)
    fast = _fast0(cfg, fcfg, B) if with_fast else None  # random B != 0: nothing folds away
    fcfg = fcfg if with_fast else None
    batch = _batch(cfg, B, S, 4)
    meta = _attention_meta(batch["attention_mask"], batch["loss_mask"], kind="glm_bidir")
    pos = jnp.asarray(np.broadcast_to(np.arange(S), (B, S)))

    dots, total = _compiled(lambda p, ids, f: forward(cfg, p, ids, pos, meta, f, 2.0), params, batch["input_ids"], fast)
    analytic = flops.forward_flops(cfg, flops.workload(S, 4, "dense", batch=B), fast=fcfg)
    assert dots == analytic
    assert XLA_BAND[0] <= total / analytic <= XLA_BAND[1], total / analytic


def test_gradient_is_three_forwards():
    """(c) jax.grad of a loss on the full-sequence logits wrt every weight
    (embeddings included): each matmul runs once forward and twice backward."""
    cfg, B, S = WIDE, 1, 16
    params = _params(cfg)
    batch = _batch(cfg, B, S, 4)
    meta = _attention_meta(batch["attention_mask"], batch["loss_mask"], kind="causal")
    pos = jnp.asarray(np.broadcast_to(np.arange(S), (B, S)))

    # Squared logits: a loss linear in the logits would let XLA drop the LM head's forward.
    def loss(p, ids):
        return jnp.sum(jnp.square(forward(cfg, p, ids, pos, meta)))

    dots, total = _compiled(jax.grad(loss), params, batch["input_ids"])
    fwd = flops.forward_flops(cfg, flops.workload(S, 0, "dense", batch=B))
    assert dots == 3 * fwd
    assert XLA_BAND[0] <= total / (3 * fwd) <= XLA_BAND[1], total / (3 * fwd)
    # The step count of SFT without gathering is the same thing.
    sft = flops.step_flops(cfg, FocusConfig(num_inner_steps=0), flops.workload(S, 0, "dense", batch=B))
    assert sft["total"] == 3 * fwd


def _step_dots(cfg: ModelConfig, fcfg: FocusConfig, B: int, S: int, R: int) -> int:
    """Matmul FLOPs of the training step's program: value_and_grad of
    focusft_loss with its aux (the inner losses are outputs), on a batch with
    P = R loss positions. phi_0 comes in as an argument (drawing it inside
    adds RNG ops, no matmuls)."""
    params, batch = _params(cfg), with_loss_positions(_batch(cfg, B, S, R), R)
    fast0 = _fast0(cfg, fcfg, B) if fcfg.num_inner_steps else None
    step = jax.value_and_grad(lambda p, b, f: focusft_loss(p, b, None, cfg, fcfg, fast0=f), has_aux=True)
    return _compiled(step, params, batch, fast0)[0]


def test_first_order_step_matches_xla():
    """The fused first_order step (bottom layer once, one inner pass through
    the top layer at the scored positions without layer start's input
    cotangent, the outer pass, the head at P positions): exact."""
    B, S, R = 2, 16, 4
    fcfg = FocusConfig(num_inner_steps=1, rank=4, fraction=0.5)
    analytic = flops.step_flops(TINY, fcfg, flops.workload(S, R, "dense", batch=B, scored=R))
    assert analytic["bottom"] > 0 and analytic["inner"] > 0
    assert _step_dots(TINY, fcfg, B, S, R) == analytic["total"]


@pytest.mark.parametrize("fused", [True, False])
def test_sft_step_matches_xla(fused):
    """SFT: the fused form (last layer at the scored positions) and the
    autodiff form (last layer at every position)."""
    B, S, R = 2, 16, 4
    fcfg = FocusConfig(num_inner_steps=0, fused_first_order=fused)
    analytic = flops.step_flops(TINY, fcfg, flops.workload(S, R, "dense", batch=B, scored=R))
    assert _step_dots(TINY, fcfg, B, S, R) == analytic["total"]


def test_xla_shares_layer_start_across_inner_passes():
    """K = 2: XLA's CSE computes the fast-weight-independent part of layer
    start once for both inner passes (not with the outer pass, start > 0)."""
    B, S, R = 2, 16, 4
    fcfg = FocusConfig(num_inner_steps=2, rank=4, fraction=0.5)
    work = flops.workload(S, R, "dense", batch=B, scored=R)
    expected = flops.step_flops(TINY, fcfg, work)["total"] - flops.shared_start_flops(TINY, fcfg, work)
    assert _step_dots(TINY, fcfg, B, S, R) == expected


@pytest.mark.parametrize("targets", [("gate_proj", "up_proj", "down_proj"), ("q_proj", "v_proj")])
def test_full_meta_gradient_approximation(targets):
    """`full` is approximate: measured 0.7% / 0.1% above XLA here."""
    B, S, R = 2, 16, 4
    fcfg = FocusConfig(num_inner_steps=1, rank=4, fraction=0.5, meta_gradient="full", targets=targets)
    analytic = flops.step_flops(TINY, fcfg, flops.workload(S, R, "dense", batch=B, scored=R))["total"]
    ratio = analytic / _step_dots(TINY, fcfg, B, S, R)
    assert 1.0 <= ratio <= 1.02, ratio


# ---------------------------------------------------------------- attention pairs


def _meta(attention_mask, loss_mask, kind):
    m = _attention_meta(jnp.asarray(attention_mask), jnp.asarray(loss_mask), kind=kind)
    return np.asarray(m.kv_start), np.asarray(m.kv_end)


@pytest.mark.parametrize("kind", ["causal", "glm_bidir"])
@pytest.mark.parametrize("seq", [1, 13])
def test_simple_pairs_match_attention_meta(kind, seq):
    """(b) the closed forms equal the pairs of attention_meta's key ranges
    (sum of kv_end - kv_start), over all queries and over the queries
    loss_targets gathers, for every response length 0..S (one row each) and
    P below, at and above the number of scored positions (padding entries
    repeat query 0; P is clipped to S)."""
    responses = np.arange(seq + 1)
    am = np.ones((len(responses), seq), np.int32)
    lm = (np.arange(seq)[None, :] >= seq - responses[:, None]).astype(np.int32)
    start, end = _meta(am, lm, kind)
    width = end - start
    for r, row in zip(responses, width):
        assert flops.attention_pairs(seq=seq, response=int(r), mask=kind) == int(row.sum()), r
    assert flops.attention_pairs(start, end) == int(width.sum())
    batch = {
        "input_ids": jnp.zeros(am.shape, jnp.int32),
        "attention_mask": jnp.asarray(am),
        "loss_mask": jnp.asarray(lm),
    }
    for P in sorted({1, 4, seq, seq + 3}):
        idx = np.asarray(_loss_targets(batch, max_positions=P).index)
        gathered = np.take_along_axis(width, idx, axis=1)
        assert flops.attention_pairs(start, end, queries=idx) == int(gathered.sum())
        for r, row in zip(responses, gathered):
            assert flops.attention_pairs(seq=seq, response=int(r), mask=kind, scored=P) == int(row.sum()), (r, P)


def test_pairs_closed_forms_and_padding():
    assert flops.attention_pairs(seq=10, mask="causal") == 55
    assert flops.attention_pairs(seq=10, response=4, mask="glm_bidir") == 36 + 7 + 8 + 9 + 10
    assert flops.attention_pairs(seq=10, response=0, mask="glm_bidir") == 100
    assert flops.attention_pairs(seq=10, response=4, mask="dense") == 100
    assert flops.attention_pairs(seq=10, response=4, mask="dense", scored=3) == 30
    # Left padding: the real queries of a padded row count as the unpadded row.
    am = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    lm = np.array([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1]])
    start, end = _meta(am, lm, "glm_bidir")
    assert flops.attention_pairs(start, end, real=am) == flops.attention_pairs(seq=7, response=3, mask="glm_bidir")
    assert flops.attention_pairs(start, end) == flops.attention_pairs(start, end, real=am) + 3  # padding sees itself
    work = flops.workload_from_meta(start, end, np.array([[6, 7, 8]]))
    assert (work.batch, work.seq, work.scored) == (1, 10, 3)
    # Query 6 ends the context (keys 3..6), queries 7 and 8 are response tokens (keys 3..7, 3..8).
    assert work.scored_pairs == 4 + 5 + 6
    with pytest.raises(ValueError):
        flops.attention_pairs(start, end, seq=10)
    with pytest.raises(ValueError):
        flops.attention_pairs(seq=4, response=5)
    with pytest.raises(ValueError):
        flops.attention_pairs(seq=4, mask="sliding")


# ---------------------------------------------------------------- structure


def test_layer_backward_rules():
    """Backward = 2x forward with weight gradients; with only the input
    cotangent 1x for the projections and still 2x for the attention (two
    activation operands); nothing when nothing is wanted."""
    cfg, T, pairs = TINY, 32, 300
    fwd = flops.layer_flops(cfg, T, T, pairs)
    attn = 4 * pairs * cfg.head_dim * cfg.num_heads
    assert fwd - flops.layer_flops(cfg, T, T, 0) == attn
    assert flops.layer_flops(cfg, T, T, pairs, backward=True) == 2 * fwd
    assert flops.layer_flops(cfg, T, T, pairs, backward=True, base_grad=False) == fwd + attn
    assert flops.layer_flops(cfg, T, T, pairs, backward=True, base_grad=False, input_grad=False) == 0
    # An inner step's layer start with FFN-only targets: no attention backward at all.
    ffn = ("gate_proj", "up_proj", "down_proj")
    kw = dict(rank=4, targets=ffn, backward=True, base_grad=False, fast_grad=True, input_grad=False)
    assert flops.layer_flops(cfg, T, T, pairs, **kw) == flops.layer_flops(cfg, T, T, 0, **kw)
    # With q_proj a target the scores' backward is back (dp and dq, not dk or dv).
    kw["targets"] = ("q_proj",)
    unit = attn // 2  # one attention matmul
    assert flops.layer_flops(cfg, T, T, pairs, **kw) - flops.layer_flops(cfg, T, T, 0, **kw) == 2 * unit


def _total(fcfg, cfg=TINY, work=None):
    work = work or flops.workload(64, 8, "glm_bidir", batch=2, scored=8)
    return flops.step_flops(cfg, fcfg, work)


def test_step_structure():
    """(d) first_order costs more than SFT, grows linearly in K; fraction 0
    is SFT (autodiff form) plus the inner losses' head forwards; full costs
    more than first_order; gathering the last layer saves work."""
    cfg = TINY.replace(num_layers=4)
    work = flops.workload(64, 8, "glm_bidir", batch=2, scored=8)
    base = FocusConfig(rank=4, fraction=0.5)
    sft = _total(dataclasses.replace(base, num_inner_steps=0), cfg, work)
    by_k = [_total(dataclasses.replace(base, num_inner_steps=k), cfg, work) for k in (1, 2, 3, 4)]
    assert all(t["total"] > sft["total"] for t in by_k)
    steps = np.diff([t["total"] for t in by_k])
    assert steps.min() == steps.max() > 0
    assert all(t["bottom"] == by_k[0]["bottom"] and t["outer"] == by_k[0]["outer"] for t in by_k)
    assert all(t["meta"] == 0 for t in by_k)
    assert sft["bottom"] == sft["inner"] == 0 and sft["total"] == sft["outer"] + sft["head"]
    # first_order's bottom + outer is SFT plus the outer pass's fast-weight forward and input cotangents.
    assert by_k[0]["bottom"] + by_k[0]["outer"] > sft["outer"]

    none_top = dataclasses.replace(base, num_inner_steps=3, fraction=0.0)
    sft_autodiff = _total(dataclasses.replace(base, num_inner_steps=0, fused_first_order=False), cfg, work)
    head_fwd = flops.head_flops(cfg, work.batch * work.scored)
    t = _total(none_top, cfg, work)
    assert t["inner"] == t["outer"] == t["meta"] == 0
    assert t["total"] == sft_autodiff["total"] + 3 * head_fwd
    assert sft_autodiff["total"] > sft["total"]  # the fused form's gathered last layer

    full = [_total(dataclasses.replace(base, num_inner_steps=k, meta_gradient="full"), cfg, work) for k in (1, 2, 3)]
    assert all(f["total"] > fo["total"] and f["meta"] > 0 for f, fo in zip(full, by_k))
    assert np.diff([f["total"] for f in full]).min() == np.diff([f["total"] for f in full]).max()
    # The bottom is not re-run per inner step, so a deeper split costs less.
    assert _total(dataclasses.replace(base, num_inner_steps=2, fraction=0.25), cfg, work)["total"] < by_k[1]["total"]
    assert by_k[1]["total"] < _total(dataclasses.replace(base, num_inner_steps=2, fraction=1.0), cfg, work)["total"]


def test_shared_start():
    work = flops.workload(16, 4, "dense", batch=2, scored=4)
    ffn = FocusConfig(num_inner_steps=2, rank=4, fraction=0.5)
    # FFN targets share q, k, v, both attention matmuls, o and gate/up: measured 524288 on a 3-layer TINY.
    assert flops.shared_start_flops(TINY.replace(num_layers=3), ffn, work) == 524288
    q = dataclasses.replace(ffn, targets=("q_proj",))
    D, kv, T = TINY.hidden_size, TINY.num_kv_heads * TINY.head_dim, work.tokens
    # Layer start is the last one here (gathered): q at the B*P scored rows, k and v at every row.
    assert flops.shared_start_flops(TINY, q, work) == 2 * 8 * D * D + 2 * 2 * T * D * kv
    assert flops.shared_start_flops(TINY, dataclasses.replace(ffn, num_inner_steps=0), work) == 0


def test_model_flops_per_token():
    cfg, S = TINY, 64
    for mask, resp in (("causal", 0), ("glm_bidir", 10), ("dense", 0)):
        work = flops.workload(S, resp, mask)
        per_token = flops.model_flops_per_token(cfg, S, mask, resp)
        assert per_token * S == pytest.approx(3 * flops.forward_flops(cfg, work), rel=1e-12)
        assert per_token * S == pytest.approx(_total(FocusConfig(num_inner_steps=0), cfg, work)["total"], rel=1e-12)
    n = flops.matmul_params(cfg)
    assert flops.model_flops_per_token(cfg, 1) == 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim


def test_step_from_description():
    cfg = TINY
    fcfg = FocusConfig(num_inner_steps=2, rank=4)
    a = flops.step_flops(cfg, fcfg, 64, 6, batch=3, scored=6)
    b = flops.step_flops(cfg, fcfg, flops.workload(64, 6, "glm_bidir", batch=3, scored=6))
    assert a == b
    assert a["total"] == sum(v for k, v in a.items() if k != "total")
    with pytest.raises(ValueError):
        flops.step_flops(cfg, fcfg, 64)
    with pytest.raises(ValueError):
        flops.step_flops(cfg, fcfg, flops.workload(64, 6), 6)
    with pytest.raises(ValueError):  # P is the Workload's, not a second value
        flops.step_flops(cfg, fcfg, flops.workload(64, 6), scored=6)

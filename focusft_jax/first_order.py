"""The first-order FocuSFT step, computed for memory.

Mechanism, not method: `bilevel.focusft_loss` calls it for `meta_gradient =
"first_order"` and for SFT (`num_inner_steps = 0`: the outer pass alone),
unless `FocusConfig.fused_first_order` is off, and hands it the inner rule
(`bilevel.InnerRule`) as a static argument; nothing here imports bilevel.
The value, the aux and the gradient are those of the autodiff form in
bilevel.py (tests hold them equal).

first_order differentiates only the outer pass, so its whole gradient can be
computed eagerly inside the loss's forward: a `jax.custom_vjp` whose backward
only scales the precomputed gradient by the incoming cotangent. That is done
for memory: left to JAX autodiff, the inner steps and the outer pass are
separate loops whose residual buffers XLA allocates together, so their peaks
add up (measured: 1.7-1.8x the temporary memory of SFT) instead of being
max(inner, outer). Here:

* the K inner steps and the outer top-layer pass are the K + 1 iterations of
  ONE loop (`lax.scan` over a `lax.cond`), so every pass's buffers are
  buffers of the loop body, reused from pass to pass;
* the layer gradient is one [L] buffer, written in place (top rows by the
  outer pass, bottom rows by the bottom backward), that is the parameter
  gradient itself.

Reverse mode through the layers is written out per layer by the model's one
stack runner (`model.run_layers(tape=True)` records each layer's VJP
residuals, `model.stack_backward` replays them), so `cfg.remat` applies as
everywhere else. The last layer runs only at the scored positions when they
are fewer than the tokens (`_top_forward` / `_top_backward`: layers
start..L-2, then that one layer with `query_index`): exact, since the loss
reads nothing else. `cfg.scan_layers = False` unrolls every loop here (XLA's
cost analysis counts a loop body once). Being a custom VJP, this form
supports reverse mode only (jax.grad / vjp, not jvp); `fused_first_order =
False` gives the autodiff form.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from focusft_jax.attention import AttnMeta
from focusft_jax.loss import LossTargets, batch_mean, per_example_ce
from focusft_jax.model import (
    ModelConfig,
    Params,
    layer_fn,
    layer_params,
    rope_cos_sin,
    run_layers,
    stack_backward,
)


def _top_forward(cfg, layers, lo, x, rope, meta, fast, fast_scale, query_index, save):
    """Layers lo..L-1 on x, the last one only at `query_index` [B, P] (or at
    every position when None). Returns (y, tape): y [B, P, D]; tape for
    `_top_backward` when `save`."""
    L = cfg.num_layers
    body_fast = jax.tree.map(lambda a: a[:-1], fast)
    last_fast = jax.tree.map(lambda a: a[-1], fast)
    tape = None
    if lo < L - 1:
        kw = dict(lo=lo, hi=L - 1, fast=body_fast, fast_scale=fast_scale, rope=rope)
        if save:
            x, tape = run_layers(cfg, layers, x, None, meta, tape=True, **kw)
        else:
            x = run_layers(cfg, layers, x, None, meta, **kw)
    last = layer_fn(cfg, fast_scale, query_index)
    args = (layer_params(layers, L - 1), x, (*rope, meta, last_fast))
    if not save:
        return last(*args), None
    y, last_vjp = jax.vjp(last, *args)
    return y, (tape, last_vjp)


def _top_backward(cfg, layers, lo, dy, tapes, rope, meta, fast, grads=None, need_dx=True):
    """Reverse of `_top_forward` from the cotangent dy [B, P, D]; the same
    contract as `model.stack_backward` (layer L-1's gradient written at row L-1)."""
    L = cfg.num_layers
    tape, last_vjp = tapes
    dlp, dx, dinv = last_vjp(dy)
    if grads is not None:
        grads = jax.tree.map(lambda buf, v: buf.at[L - 1].set(v.astype(buf.dtype)), grads, dlp)
    dfast = None if fast is None else jax.tree.map(lambda a: a[None], dinv[3])
    if lo < L - 1:
        body_fast = jax.tree.map(lambda a: a[:-1], fast)
        dx, grads, dbody = stack_backward(
            cfg, layers, dx, tape, None, meta, lo=lo, hi=L - 1, fast=body_fast, grads=grads, need_dx=need_dx, rope=rope
        )
        dfast = None if fast is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dbody, dfast)
    return dx, grads, dfast


def _head_params(cfg: ModelConfig, params: Params) -> Params:
    """The parameters `per_example_ce` reads (final norm and LM head)."""
    name = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    return {"norm": params["norm"], name: params[name]}


def _passes(cfg, rule, layers, head, bottom, fast0, rope, meta, targets, grad):
    """The K inner steps and the outer top-layer pass, as the K + 1
    iterations of one loop, on the bottom layers' output `bottom`.

    Returns (phi_K, (outer loss, has [B], grads), inner losses [K], inner
    skipped [K]); with `grad`, grads = (the [L] layer gradient with rows
    start..L-1 filled, the head's gradient, the cotangent of `bottom`), else
    None."""
    start, K, scale = rule.start, rule.num_steps, rule.fast_scale
    # The last layer only at the scored positions, when they are fewer (as bilevel.top_loss).
    gathered = targets.index.shape[1] < bottom.shape[1]
    query_index = targets.index if gathered else None

    def head_loss(hd, h, inner):
        loss, has = per_example_ce(cfg, hd, h, targets, gathered=gathered)
        return (rule.objective(loss, has) if inner else batch_mean(loss, has)), (loss, has)

    def inner_pass(phi, state):
        h, tape = _top_forward(cfg, layers, start, bottom, rope, meta, phi, scale, query_index, save=True)
        total, vjp, (loss, has) = jax.vjp(lambda h: head_loss(head, h, True), h, has_aux=True)
        (dh,) = vjp(jnp.ones_like(total))
        _, _, grads = _top_backward(cfg, layers, start, dh, tape, rope, meta, phi, need_dx=False)
        return rule.update(state, phi, grads, loss, has)

    def outer_pass(phi):
        if not grad:
            h, _ = _top_forward(cfg, layers, start, bottom, rope, meta, phi, scale, query_index, save=False)
            total, (_, has) = head_loss(head, h, False)
            return total, has, None
        h, tape = _top_forward(cfg, layers, start, bottom, rope, meta, phi, scale, query_index, save=True)
        total, vjp, (_, has) = jax.vjp(lambda hd, h: head_loss(hd, h, False), head, h, has_aux=True)
        dhead, dh = vjp(jnp.ones_like(total))
        # Rows start..L-1 of the [L] layer gradient; the bottom backward
        # writes the other rows of the same buffer later.
        dlayers = jax.tree.map(jnp.zeros_like, layers)
        dbottom, dlayers, _ = _top_backward(cfg, layers, start, dh, tape, rope, meta, phi, dlayers)
        return total, has, (dlayers, dhead, dbottom)

    if K == 0:  # SFT: the outer pass alone, no fast weights
        return fast0, outer_pass(fast0), jnp.zeros((0,)), jnp.zeros((0,), jnp.int32)
    state = rule.init(fast0)
    # The outer pass's results leave the loop in its carry, which no branch
    # reads. The inner branch fills it with fresh zeros rather than passing
    # it through: XLA copies an operand that a conditional returns unchanged
    # (measured: +50% temp memory).
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    outer_shape = jax.eval_shape(outer_pass, fast0)
    stats_shape = jax.eval_shape(lambda p, s: inner_pass(p, s)[2:], fast0, state)

    def step(carry, k):
        phi, state, _ = carry

        def inner(phi, state):
            phi, state, mean, skip = inner_pass(phi, state)
            return (phi, state, zeros(outer_shape)), (mean, skip)

        def outer(phi, state):
            return (phi, state, outer_pass(phi)), zeros(stats_shape)

        if isinstance(k, int):  # unrolled: the pass is known
            return (inner if k < K else outer)(phi, state)
        return jax.lax.cond(k < K, inner, outer, phi, state)

    init = (fast0, state, zeros(outer_shape))
    if cfg.scan_layers:
        (phi, _, out), (losses, skipped) = jax.lax.scan(step, init, jnp.arange(K + 1))
    else:  # unrolled with the layers: every pass is in the program once, as XLA's cost analysis counts it
        carry, stats = init, []
        for k in range(K + 1):
            carry, s = step(carry, k)
            stats.append(s)
        (phi, _, out), (losses, skipped) = carry, jax.tree.map(lambda *a: jnp.stack(a), *stats)
    return phi, out, losses[:K], skipped[:K]


def _first_order_value(cfg, rule, layers, head, x0, fast0, positions, meta, targets, grad):
    start = rule.start
    rope = rope_cos_sin(cfg, positions)
    bottom, tape = x0, None
    if start > 0:
        if grad:
            bottom, tape = run_layers(cfg, layers, x0, None, meta, hi=start, tape=True, rope=rope)
        else:
            bottom = run_layers(cfg, layers, x0, None, meta, hi=start, rope=rope)
    _, (loss, has, grads), losses, skipped = _passes(cfg, rule, layers, head, bottom, fast0, rope, meta, targets, grad)
    out = (loss, jnp.sum(has), losses, skipped)
    if not grad:
        return out, None
    dlayers, dhead, dx0 = grads
    if start > 0:
        dx0, dlayers, _ = stack_backward(cfg, layers, dx0, tape, None, meta, hi=start, grads=dlayers, rope=rope)
    return out, (dlayers, dhead, dx0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _first_order_core(cfg, rule, layers, head, x0, fast0, positions, meta, targets):
    """(outer loss, examples with loss tokens, inner losses [K], inner skipped
    [K]) of the first-order step, from the embeddings x0. Differentiable wrt
    layers, head and x0 (phi_K is a constant there, as first_order says); the
    VJP computes the gradient eagerly in the forward (see above)."""
    return _first_order_value(cfg, rule, layers, head, x0, fast0, positions, meta, targets, grad=False)[0]


def _first_order_fwd(cfg, rule, layers, head, x0, fast0, positions, meta, targets):
    return _first_order_value(cfg, rule, layers, head, x0, fast0, positions, meta, targets, grad=True)


def _first_order_bwd(cfg, rule, res, cts):
    ct = cts[0]  # the aux outputs (counts, inner statistics) carry no gradient
    scaled = jax.tree.map(lambda g: (g * ct).astype(g.dtype), res)
    return (*scaled, None, None, None, None)


_first_order_core.defvjp(_first_order_fwd, _first_order_bwd)


def first_order_loss(
    cfg: ModelConfig,
    rule,
    params: Params,
    x0: jax.Array,
    fast0: Params | None,
    positions: jax.Array,
    meta: AttnMeta,
    targets: LossTargets,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The first-order step's outer loss from the embeddings x0 [B, S, D],
    with the same value and gradient (wrt params and x0) as the autodiff form.

    rule: the inner rule (`bilevel.InnerRule`, static): `start` (first layer
    with fast weights), `num_steps` (K; 0 is SFT, fast0 None), `fast_scale`,
    `objective(loss, has)`, `init(phi)` and `update(state, phi, grads, loss,
    has) -> (phi, state, mean inner loss, skipped)`. Handed in rather than
    imported, so the method's rule has one home (bilevel.py).
    Returns (loss, examples with loss tokens, inner losses [K], inner skipped [K]).
    """
    fast0 = jax.lax.stop_gradient(fast0)
    return _first_order_core(cfg, rule, params["layers"], _head_params(cfg, params), x0, fast0, positions, meta, targets)

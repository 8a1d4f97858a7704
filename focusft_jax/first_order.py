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
for memory. Left to JAX autodiff and XLA, the inner steps and the outer pass
were separate while loops whose residual buffers were all allocated at the
start, so their peaks added up (inner + inner + outer, 1.7-1.8x the temporary
memory of SFT) instead of being max(inner, outer); and slicing the stacked
layers into bottom and top copied the parameters and their gradients. Here:

* the K inner steps and the outer top-layer pass are the K + 1 iterations of
  ONE loop (`lax.scan` over a `lax.cond`), so every pass's buffers are
  buffers of the loop body, reused from pass to pass;
* no layer is sliced out of the stacked parameters: the loops index the full
  [L] stack, and the layer gradient is one [L] buffer, written in place (top
  rows by the outer pass, bottom rows by the bottom backward), that is the
  parameter gradient itself.

Reverse mode through the layers is written out per layer with `jax.vjp`
(`_stack_forward` saves each layer's VJP residuals, `_stack_backward` replays
them), so the remat policy `cfg.remat` applies as in `model.run_layers`. The last
layer runs only at the scored positions when they are fewer than the tokens
(`_top_forward` / `_top_backward`: the scanned layers start..L-2, then that
one layer with `decoder_layer(query_index=...)`): exact, since the loss
reads nothing else. (Under plain autodiff the same split would copy the
parameters of the scanned slice, so bilevel.py does not do it.)
`cfg.scan_layers = False` unrolls these loops too (XLA's cost analysis counts
a loop body once). Being a custom VJP, this form supports reverse mode only
(jax.grad / vjp, not jvp); `fused_first_order = False` gives the autodiff form.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from focusft_jax.attention import AttnMeta
from focusft_jax.loss import LossTargets, batch_mean, per_example_ce
from focusft_jax.model import (
    ModelConfig,
    Params,
    decoder_layer,
    remat_layer,
    rope_cos_sin,
)


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _layer_fn(cfg: ModelConfig, fast_scale: float, query_index=None):
    """One decoder layer as f(lp, x, (cos, sin, meta, fast)), checkpointed per
    `cfg.remat`; with `query_index` [B, P] its output only at those positions."""

    def layer(lp, x, inv):
        cos, sin, meta, fl = inv
        return decoder_layer(cfg, lp, x, cos, sin, meta, fl, fast_scale, query_index=query_index)[0]

    return remat_layer(cfg, layer)


class _Tape(NamedTuple):
    """VJP residuals of a stack of layers: `saved` (stacked over the layers)
    and the static recipe that rebuilds a layer's VJP function from them and
    from what the backward re-reads instead of saving (the layer's
    parameters, the loop invariants, its fast weights)."""

    saved: tuple
    recipe: tuple
    treedef: object


def _stack_forward(cfg, layers, lo, hi, x, inv, fast, fast_scale, save):
    """Runs layers lo..hi-1 of the stacked `layers` (indexed in the loop, never
    sliced). inv = (cos, sin, meta); fast: fast weights stacked over the
    hi - lo layers, or None. Returns (x, _Tape if `save` else None)."""
    box = {}
    f = _layer_fn(cfg, fast_scale)

    def body(h, xs):
        i, fl = xs
        lp = _index(layers, i)
        args = (lp, h, (*inv, fl))
        if not save:
            return f(*args), None
        y, vjp = jax.vjp(f, *args)
        leaves, treedef = jax.tree.flatten(vjp)
        # Residuals that are this layer's inputs (other than h) are re-read in
        # the backward, not stacked (stacking the parameters would copy them).
        known = {id(a): n for n, a in enumerate(jax.tree.leaves((lp, args[2])))}
        recipe, saved, pos = [], [], {}
        for leaf in leaves:
            if id(leaf) in known:
                recipe.append((True, known[id(leaf)]))
            else:
                if id(leaf) not in pos:
                    pos[id(leaf)] = len(saved)
                    saved.append(leaf)
                recipe.append((False, pos[id(leaf)]))
        box["recipe"], box["treedef"] = tuple(recipe), treedef
        return y, tuple(saved)

    idx = jnp.arange(lo, hi, dtype=jnp.int32)
    x, saved = jax.lax.scan(body, x, (idx, fast), unroll=not cfg.scan_layers)
    return x, (_Tape(saved, box["recipe"], box["treedef"]) if save else None)


def _stack_backward(cfg, layers, lo, hi, dx, tape, inv, fast, grads=None, need_dx=True):
    """Reverse pass through layers hi-1..lo from `tape`. dx: cotangent of the
    stack's output. grads: optional [L] parameter-gradient buffer (like
    `layers`); layer i's gradient is written, in place, at row i.

    need_dx=False: the cotangent of the stack's input is not wanted (an inner
    step: nothing below layer lo has fast weights), so layer lo's iteration
    takes a branch without it, and XLA drops what only that cotangent needed
    from the branch (with the default FFN targets, the whole attention
    backward of layer lo). A branch
    inside the loop rather than layer lo peeled off after it: XLA would run
    a peeled layer's rematerialised forward before the loop and hold its
    buffers through it. Returns (dx of the stack's input (zeros with
    need_dx=False), grads, the fast-weight gradient stacked like `fast`, or
    None). What no caller uses (e.g. the base-weight gradient of an inner
    step) is never computed either: XLA drops it from the loop body."""

    def body(carry, xs):
        d, g = carry
        i, fl = xs
        lp = _index(layers, i)
        saved = [jax.lax.dynamic_index_in_dim(a, i - lo, 0, keepdims=False) for a in tape.saved]
        known = jax.tree.leaves((lp, (*inv, fl)))
        leaves = [known[n] if is_known else saved[n] for is_known, n in tape.recipe]
        vjp = jax.tree.unflatten(tape.treedef, leaves)

        def full(d):
            dlp, d, dinv = vjp(d)
            return d, dlp, (None if fl is None else dinv[3])

        def without_dx(d):
            dlp, _, dinv = vjp(d)
            return jnp.zeros_like(d), dlp, (None if fl is None else dinv[3])

        d, dlp, dfl = full(d) if need_dx else jax.lax.cond(i == lo, without_dx, full, d)
        if g is not None:
            g = jax.tree.map(lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), i, 0), g, dlp)
        return (d, g), dfl

    idx = jnp.arange(lo, hi, dtype=jnp.int32)
    (dx, grads), dfast = jax.lax.scan(body, (dx, grads), (idx, fast), reverse=True, unroll=not cfg.scan_layers)
    return dx, grads, dfast


def _top_forward(cfg, layers, lo, x, inv, fast, fast_scale, query_index, save):
    """Layers lo..L-1 on x, the last one only at `query_index` [B, P] (or at
    every position when None). Returns (y, tape): y [B, P, D]; tape for
    `_top_backward` when `save`."""
    L = cfg.num_layers
    body_fast = jax.tree.map(lambda a: a[:-1], fast)
    last_fast = jax.tree.map(lambda a: a[-1], fast)
    tape = None
    if lo < L - 1:
        x, tape = _stack_forward(cfg, layers, lo, L - 1, x, inv, body_fast, fast_scale, save)

    last = _layer_fn(cfg, fast_scale, query_index)
    args = (_index(layers, L - 1), x, (*inv, last_fast))
    if not save:
        return last(*args), None
    y, last_vjp = jax.vjp(last, *args)
    return y, (tape, last_vjp)


def _top_backward(cfg, layers, lo, dy, tapes, inv, fast, grads=None, need_dx=True):
    """Reverse of `_top_forward` from the cotangent dy [B, P, D]; the same
    contract as `_stack_backward` (layer L-1's gradient written at row L-1)."""
    L = cfg.num_layers
    tape, last_vjp = tapes
    dlp, dx, dinv = last_vjp(dy)
    if grads is not None:
        grads = jax.tree.map(lambda buf, v: buf.at[L - 1].set(v.astype(buf.dtype)), grads, dlp)
    dfast = None if fast is None else jax.tree.map(lambda a: a[None], dinv[3])
    if lo < L - 1:
        body_fast = jax.tree.map(lambda a: a[:-1], fast)
        dx, grads, dbody = _stack_backward(cfg, layers, lo, L - 1, dx, tape, inv, body_fast, grads, need_dx)
        dfast = None if fast is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dbody, dfast)
    return dx, grads, dfast


def _head_params(cfg: ModelConfig, params: Params) -> Params:
    """The parameters `per_example_ce` reads (final norm and LM head)."""
    name = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    return {"norm": params["norm"], name: params[name]}


def _passes(cfg, rule, layers, head, bottom, fast0, inv, targets, grad):
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
        h, tape = _top_forward(cfg, layers, start, bottom, inv, phi, scale, query_index, save=True)
        total, vjp, (loss, has) = jax.vjp(lambda h: head_loss(head, h, True), h, has_aux=True)
        (dh,) = vjp(jnp.ones_like(total))
        _, _, grads = _top_backward(cfg, layers, start, dh, tape, inv, phi, need_dx=False)
        return rule.update(state, phi, grads, loss, has)

    def outer_pass(phi):
        if not grad:
            h, _ = _top_forward(cfg, layers, start, bottom, inv, phi, scale, query_index, save=False)
            total, (_, has) = head_loss(head, h, False)
            return total, has, None
        h, tape = _top_forward(cfg, layers, start, bottom, inv, phi, scale, query_index, save=True)
        total, vjp, (_, has) = jax.vjp(lambda hd, h: head_loss(hd, h, False), head, h, has_aux=True)
        dhead, dh = vjp(jnp.ones_like(total))
        # Rows start..L-1 of the [L] layer gradient; the bottom backward
        # writes the other rows of the same buffer later.
        dlayers = jax.tree.map(jnp.zeros_like, layers)
        dbottom, dlayers, _ = _top_backward(cfg, layers, start, dh, tape, inv, phi, dlayers)
        return total, has, (dlayers, dhead, dbottom)

    if K == 0:  # SFT: the outer pass alone, no fast weights
        return fast0, outer_pass(fast0), jnp.zeros((0,)), jnp.zeros((0,), jnp.int32)
    state = rule.init(fast0)
    if not cfg.scan_layers:  # unrolled, so that XLA's cost analysis sees every pass
        phi, losses, skipped = fast0, [], []
        for _ in range(K):
            phi, state, mean, skip = inner_pass(phi, state)
            losses.append(mean)
            skipped.append(skip)
        return phi, outer_pass(phi), jnp.stack(losses), jnp.stack(skipped)

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

        return jax.lax.cond(k < K, inner, outer, phi, state)

    (phi, _, out), (losses, skipped) = jax.lax.scan(step, (fast0, state, zeros(outer_shape)), jnp.arange(K + 1))
    return phi, out, losses[:K], skipped[:K]


def _first_order_value(cfg, rule, layers, head, x0, fast0, positions, meta, targets, grad):
    start = rule.start
    inv = (*rope_cos_sin(cfg, positions), meta)
    bottom, tape = x0, None
    if start > 0:
        bottom, tape = _stack_forward(cfg, layers, 0, start, x0, inv, None, 1.0, save=grad)
    _, (loss, has, grads), losses, skipped = _passes(cfg, rule, layers, head, bottom, fast0, inv, targets, grad)
    out = (loss, jnp.sum(has), losses, skipped)
    if not grad:
        return out, None
    dlayers, dhead, dx0 = grads
    if start > 0:
        dx0, dlayers, _ = _stack_backward(cfg, layers, 0, start, dx0, tape, inv, None, dlayers)
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

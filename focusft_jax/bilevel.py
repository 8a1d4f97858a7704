"""FocuSFT's bilevel step (METHOD.md): the method itself, in one place.

    one training step, batch of examples, step RNG
      meta   = attention metadata (glm_bidir by default; same in both loops)
      h      = bottom layers 0..start-1 (no fast weights): computed ONCE
      phi_0  = fresh fast weights: A ~ U(+-1/sqrt(in)), B = 0
      inner loop, k = 1..K (fast weights only, base weights theta fixed):
          L_in  = masked CE through the top layers with phi_{k-1}
          g     = d L_in / d phi, each tensor clipped to norm c, then SGD
          phi_k = phi_{k-1} - lr * g      (unchanged where L_in is not finite)
      outer:  L_out = masked CE through the top layers with phi_K
              first_order: phi_K is a constant (stop-gradient)
              full:        d L_out / d theta flows through the unrolled inner loop

This file is the method as JAX autodiff reads it, and its one home: the inner
rule (`InnerRule`), the step's mask, positions and loss targets, and the aux
are built here only. `first_order` (and SFT) runs by default through
first_order.py, mechanism that this file hands the inner rule to (the same
loss and gradient, the inner steps and the outer pass in one loop, the last
layer only at the scored positions); first_order.py imports nothing back.

With per-example scope each example adapts its own phi (leading example axis):
the inner objective is the sum of per-example losses, so every example's
gradient is its own, unscaled by the batch size. `num_inner_steps = 0` is SFT
with the glm_bidir mask; `attention = "causal"` on top of that is plain SFT.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from focusft_jax.attention import ATTENTION_KINDS, AttnMeta, attention_meta
from focusft_jax.errors import ConfigError
from focusft_jax.fast_weights import (
    FAST_TARGETS,
    SCOPES,
    fast_start_layer,
    init_fast_weights,
)
from focusft_jax.first_order import first_order_loss
from focusft_jax.loss import LossTargets, batch_mean, loss_targets, per_example_ce
from focusft_jax.model import ModelConfig, Params, embed, run_layers

META_GRADIENTS = ("first_order", "full")


@dataclasses.dataclass(frozen=True)
class FocusConfig:
    """Static settings of the method (METHOD.md defaults). Also the YAML
    `method:` section itself (config.py builds it from the field types); an
    impossible value raises ConfigError naming the field; each field's meaning
    is its metadata "help" (`train.py --help-config`). The number of
    scored positions is not a setting: it is a shape of the batch (its
    loss_index / loss_target / loss_weight keys, `loss.loss_targets`)."""

    num_inner_steps: int = dataclasses.field(
        default=2,
        metadata={"help": "K, the inner SGD steps on the fast weights; 0 is SFT"},
    )
    inner_lr: float = dataclasses.field(default=1.0, metadata={"help": "inner SGD learning rate"})
    inner_clip: float = dataclasses.field(default=1.0, metadata={"help": "inner per-tensor gradient clip norm"})
    rank: int = dataclasses.field(default=32, metadata={"help": "fast LoRA rank"})
    alpha: float = dataclasses.field(default=64.0, metadata={"help": "fast LoRA alpha (scale alpha / rank)"})
    fraction: float = dataclasses.field(default=0.35, metadata={"help": "top fraction of layers with fast weights"})
    targets: tuple[str, ...] = dataclasses.field(
        default=("gate_proj", "up_proj", "down_proj"),
        metadata={"help": "projections with fast weights: any of q/k/v/o/gate/up/down `_proj`"},
    )
    scope: Literal[SCOPES] = dataclasses.field(
        default="per_example",
        metadata={"help": "`per_example` or `shared` (one memory per batch)"},
    )
    meta_gradient: Literal[META_GRADIENTS] = dataclasses.field(
        default="first_order",
        metadata={"help": "the outer gradient: `first_order` or `full` (through the inner loop)"},
    )
    attention: Literal[ATTENTION_KINDS] = dataclasses.field(
        default="glm_bidir",
        metadata={"help": "`glm_bidir` or `causal` (the ablation / plain SFT)"},
    )
    fused_first_order: bool = dataclasses.field(
        default=True,
        metadata={"help": (
            "`first_order` and SFT (`num_inner_steps: 0`) through `focusft_jax/first_order.py` (same loss and"
            " gradient; FocuSFT in about 1.1× SFT's temporary memory instead of 1.7×; reverse mode only); "
            "`false`: plain JAX autodiff of `bilevel.py`"
        )},
    )

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.num_inner_steps < 0:
            raise ConfigError(f"num_inner_steps: must be >= 0, got {self.num_inner_steps}")
        if self.rank < 1:
            raise ConfigError(f"rank: must be >= 1, got {self.rank}")
        if self.inner_clip <= 0:
            raise ConfigError(f"inner_clip: must be > 0, got {self.inner_clip}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha: must be > 0 (the fast weights' scale is alpha / rank), got {self.alpha}")
        if not self.inner_lr >= 0:
            raise ConfigError(f"inner_lr: must be >= 0, got {self.inner_lr}")
        for key, allowed in (("scope", SCOPES), ("meta_gradient", META_GRADIENTS), ("attention", ATTENTION_KINDS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: expected one of {list(allowed)}, got {getattr(self, key)!r}")
        for t in self.targets:
            if t not in FAST_TARGETS:
                raise ConfigError(f"targets: {t!r} is not one of {list(FAST_TARGETS)}")
        if not self.targets:
            raise ConfigError("targets: the inner loop needs at least one target projection")

    @property
    def fast_scale(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------- inner optimizer


def _safe_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """L2 norm over `axes` whose derivative is finite at x = 0 (A's gradient
    is exactly 0 at inner step 1, and the full mode differentiates this)."""
    sq = jnp.sum(jnp.square(x), axis=axes, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Clips each fast-weight tensor to L2 norm `max_norm` on its own:
    g <- g * c / (||g|| + 1e-12) where ||g|| > c. A tensor is the last two
    axes of a leaf; leading axes (layer, example) index separate tensors."""

    def update(updates, state, params=None):
        def clip(g):
            norm = _safe_norm(g, (-2, -1))
            return jnp.where(norm > max_norm, g * (max_norm / (norm + 1e-12)), g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def inner_optimizer(fcfg: FocusConfig) -> optax.GradientTransformation:
    """The inner loop's update rule: per-tensor clip, then plain SGD."""
    return optax.chain(clip_per_tensor(fcfg.inner_clip), optax.sgd(fcfg.inner_lr))


@dataclasses.dataclass(frozen=True)
class InnerRule:
    """The inner loop's rule as one static (hashable) value, for code that
    runs the loop itself (first_order.py): where the fast weights start, how
    many steps, the objective and the update, all defined in this file."""

    fcfg: FocusConfig
    start: int

    @property
    def num_steps(self) -> int:
        return self.fcfg.num_inner_steps

    @property
    def fast_scale(self) -> float:
        return self.fcfg.fast_scale

    def objective(self, loss: jax.Array, has: jax.Array) -> jax.Array:
        return inner_objective(self.fcfg, loss, has)

    def init(self, phi: Params):
        return inner_optimizer(self.fcfg).init(phi)

    def update(self, state, phi: Params, grads: Params, loss: jax.Array, has: jax.Array):
        return inner_update(self.fcfg, inner_optimizer(self.fcfg), state, phi, grads, loss, has)


# ---------------------------------------------------------------- pieces


class StepContext(NamedTuple):
    """What both loops share: the mask, positions, loss targets, and the
    output of the bottom layers."""

    meta: AttnMeta
    positions: jax.Array
    targets: LossTargets
    bottom: jax.Array


def mask_and_positions(batch: dict, fcfg: FocusConfig) -> tuple[AttnMeta, jax.Array]:
    """The attention metadata of the batch (one function for both loops) and
    its positions (restarting in every packed example unless given)."""
    meta = attention_meta(batch["attention_mask"], batch["loss_mask"], batch.get("segment_ids"), fcfg.attention)
    positions = batch.get("positions")
    if positions is None:
        idx = jnp.arange(batch["input_ids"].shape[1], dtype=jnp.int32)
        positions = jnp.maximum(idx[None, :] - meta.kv_start, 0)
    return meta, positions


def prepare(params: Params, batch: dict, cfg: ModelConfig, fcfg: FocusConfig) -> StepContext:
    """Builds the mask metadata (one function for both loops), positions
    (restarting in every packed example) and loss targets, and runs the layers
    below the fast-weight layers once."""
    meta, positions = mask_and_positions(batch, fcfg)
    targets = loss_targets(batch)
    start = split_layer(cfg, fcfg)
    x = embed(cfg, params, batch["input_ids"])
    if start > 0:
        x = run_layers(cfg, params["layers"], x, positions, meta, hi=start)
    return StepContext(meta, positions, targets, x)


def split_layer(cfg: ModelConfig, fcfg: FocusConfig) -> int:
    """Index of the first layer with fast weights (all layers are 'top' when
    there is no inner loop, so nothing is split)."""
    if fcfg.num_inner_steps == 0:
        return 0
    return fast_start_layer(cfg.num_layers, fcfg.fraction)


def top_loss(
    params: Params, fast: Params | None, ctx: StepContext, cfg: ModelConfig, fcfg: FocusConfig
) -> tuple[jax.Array, jax.Array]:
    """Per-example masked CE through the top layers with fast weights `fast`.
    Returns (loss [B], has_tokens [B])."""
    start = split_layer(cfg, fcfg)
    h = run_layers(cfg, params["layers"], ctx.bottom, ctx.positions, ctx.meta, lo=start, fast=fast, fast_scale=fcfg.fast_scale)
    return per_example_ce(cfg, params, h, ctx.targets)


def _per_example(mask: jax.Array, leaf: jax.Array, scope: str) -> jax.Array:
    """Broadcasts a per-example [E] (or scalar, shared scope) flag over a
    fast-weight leaf [n_top, (E,) a, b]."""
    if scope == "shared":
        return mask
    return mask[None, :, None, None]


def inner_update(fcfg: FocusConfig, opt, state, phi: Params, grads: Params, loss: jax.Array, has: jax.Array):
    """One clipped-SGD step of the inner loop from the gradient `grads` of the
    inner objective at `phi` (per-example losses `loss` [B], `has` [B]).
    Returns (phi', state', mean inner loss, skipped count); the mean is over
    the examples with loss tokens and a finite loss, NaN when there are none."""
    per_example = fcfg.scope == "per_example"
    updates, state = opt.update(grads, state, phi)
    new_phi = optax.apply_updates(phi, updates)
    finite = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        axes = tuple(i for i in range(g.ndim) if i != 1) if per_example else None
        finite = finite & jnp.all(jnp.isfinite(g), axis=axes)
    if not per_example:
        finite = jnp.all(finite)
    phi = jax.tree.map(lambda new, old: jnp.where(_per_example(finite, new, fcfg.scope), new, old), new_phi, phi)
    # Mean over the examples with a finite loss; NaN (logged as missing, not
    # as a loss of 0) when there is none.
    counted = has & jnp.isfinite(loss)
    mean = jnp.where(jnp.any(counted), batch_mean(jnp.where(counted, loss, 0.0), counted), jnp.nan)
    skipped = jnp.sum(~finite & has) if per_example else (~finite).astype(jnp.int32)
    return phi, state, mean, skipped


def inner_objective(fcfg: FocusConfig, loss: jax.Array, has: jax.Array) -> jax.Array:
    """The scalar the inner step differentiates: with per-example phi the sum
    of per-example losses keeps every example's gradient its own."""
    if fcfg.scope == "per_example":
        return jnp.sum(jnp.where(has, loss, 0.0))
    return batch_mean(loss, has)


def inner_adapt(
    params: Params, fast0: Params, ctx: StepContext, cfg: ModelConfig, fcfg: FocusConfig
) -> tuple[Params, jax.Array, jax.Array]:
    """K unrolled steps of clipped SGD on the fast weights (base weights fixed).

    Returns (phi_K, inner_losses [K] (mean over examples with loss tokens,
    at phi_{k-1}), skipped [K] (examples whose step was not finite)).
    Differentiable end to end: the `full` meta-gradient takes jax.grad of this.
    """
    opt = inner_optimizer(fcfg)

    def objective(phi):
        loss, has = top_loss(params, phi, ctx, cfg, fcfg)
        return inner_objective(fcfg, loss, has), (loss, has)

    phi, state = fast0, opt.init(fast0)
    losses, skipped = [], []
    for _ in range(fcfg.num_inner_steps):
        (_, (loss, has)), grads = jax.value_and_grad(objective, has_aux=True)(phi)
        phi, state, mean, skip = inner_update(fcfg, opt, state, phi, grads, loss, has)
        losses.append(mean)
        skipped.append(skip)
    return phi, jnp.stack(losses), jnp.stack(skipped)


def draw_fast_weights(rng: jax.Array, batch_size: int, cfg: ModelConfig, fcfg: FocusConfig) -> Params:
    """phi_0 for one step from the step's RNG (example axis for per-example scope)."""
    start = fast_start_layer(cfg.num_layers, fcfg.fraction)
    return init_fast_weights(
        cfg,
        rng,
        num_top=cfg.num_layers - start,
        targets=fcfg.targets,
        rank=fcfg.rank,
        batch=batch_size if fcfg.scope == "per_example" else None,
    )


# ---------------------------------------------------------------- the step's loss


def focusft_loss(
    params: Params,
    batch: dict,
    rng: jax.Array,
    cfg: ModelConfig,
    fcfg: FocusConfig,
    fast0: Params | None = None,
) -> tuple[jax.Array, dict]:
    """The outer loss L_out of one FocuSFT step; jax.grad of it wrt params is
    the meta-gradient of `fcfg.meta_gradient`.

    batch: input_ids, attention_mask, loss_mask [B, S] (optional segment_ids,
    positions). rng: the step's key, from which phi_0 is drawn unless `fast0`
    (same layout as `draw_fast_weights`) is given. cfg, fcfg are static.
    Returns (loss, aux) with aux: inner_losses [K], inner_skipped [K],
    loss_tokens, dropped_tokens, examples (with loss tokens).
    """
    if fcfg.num_inner_steps > 0 and fast0 is None:
        fast0 = draw_fast_weights(rng, batch["input_ids"].shape[0], cfg, fcfg)
    sft = fcfg.num_inner_steps == 0
    start = split_layer(cfg, fcfg)
    fused = fcfg.fused_first_order and (sft or fcfg.meta_gradient == "first_order") and start < cfg.num_layers
    if fused:
        meta, positions = mask_and_positions(batch, fcfg)
        targets = loss_targets(batch)
        x0 = embed(cfg, params, batch["input_ids"])
        rule = InnerRule(fcfg, start)
        loss, examples, inner_losses, skipped = first_order_loss(cfg, rule, params, x0, fast0, positions, meta, targets)
    else:
        ctx = prepare(params, batch, cfg, fcfg)
        targets = ctx.targets
        phi, inner_losses, skipped = None, jnp.zeros((0,)), jnp.zeros((0,), jnp.int32)
        if fcfg.num_inner_steps > 0:
            if fcfg.meta_gradient == "first_order":
                # Constant inputs: no derivative of the inner loop is ever built.
                frozen = jax.lax.stop_gradient((params, ctx))
                phi, inner_losses, skipped = inner_adapt(frozen[0], fast0, frozen[1], cfg, fcfg)
                phi = jax.lax.stop_gradient(phi)
            else:
                phi, inner_losses, skipped = inner_adapt(params, fast0, ctx, cfg, fcfg)
        per_example, has = top_loss(params, phi, ctx, cfg, fcfg)
        loss, examples = batch_mean(per_example, has), jnp.sum(has)
    aux = {
        "inner_losses": inner_losses,
        "inner_skipped": skipped,
        "loss_tokens": jnp.sum(targets.weight),
        "dropped_tokens": targets.dropped,
        "examples": examples,
    }
    return loss, aux

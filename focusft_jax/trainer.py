"""One optimizer step: gradient accumulation over micro-batches, the FocuSFT
(or SFT) loss, clipping and AdamW, and skipping of non-finite steps."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from focusft_jax.bilevel import FocusConfig, focusft_loss
from focusft_jax.model import ModelConfig, Params


@struct.dataclass
class TrainState:
    """step: optimizer steps taken; skipped: steps skipped for non-finite
    gradients (parameters and optimizer state left unchanged)."""

    step: jax.Array
    params: Params
    opt_state: Any
    skipped: jax.Array


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        skipped=jnp.zeros((), jnp.int32),
    )


def state_shardings(params: Params, optimizer: optax.GradientTransformation):
    """The shardings of `init_state(params, optimizer)`, leaf for leaf: the
    params' own (`params` are placed jax.Arrays or jax.ShapeDtypeStructs
    with shardings, all on one mesh), and for every optimizer leaf that has
    a parameter's shape at the end of that parameter's key path (AdamW's mu
    and nu of `['layers']['q_proj']['kernel']`) that parameter's sharding;
    the rest (counts, the step) replicated.

    Why not leave it to jit: optax builds the moments with zeros_like, whose
    output XLA does not tie to the input's sharding, so `jit(init_state)`
    replicates them on every device (60 GiB of state per device for
    Qwen2.5-7B on 8 devices; 10.6 GiB sharded, bench/scale.py).
    """
    by_path = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_path[_dict_keys(path)] = (p.shape, p.sharding)
    mesh = next(iter(by_path.values()))[1].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), params)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):  # the longest key-path suffix that names a parameter
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def init_state_sharded(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """`init_state` on placed params, every optimizer moment sharded as its
    parameter (`state_shardings`)."""
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_shardings(params, optimizer))(params)


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    cfg: ModelConfig,
    fcfg: FocusConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict]:
    """One optimizer step over `batch`, whose arrays are [A, micro, S]: A
    micro-batches accumulated. The step's gradient is the gradient of the
    mean loss over all examples with loss tokens (micro-batch gradients are
    weighted by their number of such examples). rng: the step's key (fast
    weights of micro-batch a are drawn from fold_in(rng, a)).
    Returns (new state, metrics)."""
    grad_fn = jax.value_and_grad(focusft_loss, has_aux=True)
    num_micro = batch["input_ids"].shape[0]

    def micro(carry, xs):
        g_sum, loss_sum, n_sum, inner_sum, inner_n = carry
        mb, a = xs
        (loss, aux), g = grad_fn(state.params, mb, jax.random.fold_in(rng, a), cfg, fcfg)
        n = aux["examples"].astype(jnp.float32)
        g_sum = jax.tree.map(lambda s, x: s + n * x.astype(jnp.float32), g_sum, g)
        # A micro-batch's inner loss is NaN where none of its examples had a
        # finite one: it is left out of the step's mean, not counted as 0.
        counted = jnp.isfinite(aux["inner_losses"]) & (n > 0)
        inner = jnp.where(counted, aux["inner_losses"] * n, 0.0)
        inner_n = inner_n + jnp.where(counted, n, 0.0)
        stats = (aux["loss_tokens"], aux["dropped_tokens"], jnp.sum(aux["inner_skipped"]))
        return (g_sum, loss_sum + n * loss, n_sum + n, inner_sum + inner, inner_n), stats

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    k_zeros = jnp.zeros((fcfg.num_inner_steps,))
    init = (zeros, jnp.zeros(()), jnp.zeros(()), k_zeros, k_zeros)
    (g_sum, loss_sum, n_sum, inner_sum, inner_n), stats = jax.lax.scan(
        micro, init, (batch, jnp.arange(num_micro))
    )
    denom = jnp.maximum(n_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ok = _finite(grads) & jnp.isfinite(loss_sum)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = {
        "loss": loss_sum / denom,
        # NaN (null in metrics.jsonl) for an inner step no example had a finite loss in
        "inner_losses": jnp.where(inner_n > 0, inner_sum / jnp.maximum(inner_n, 1.0), jnp.nan),
        "grad_norm": optax.global_norm(grads),
        "examples": n_sum,
        "loss_tokens": jnp.sum(stats[0]),
        "dropped_tokens": jnp.sum(stats[1]),
        "inner_skipped": jnp.sum(stats[2]),
        "step_skipped": (~ok).astype(jnp.int32),
    }
    return new_state, metrics

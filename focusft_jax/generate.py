"""Batched autoregressive generation with a KV cache.

One jitted function (`generate_tokens`) runs a whole batch of left-padded
prompts: a single prefill forward writes the prompt's keys and values into a
cache of length `P + max_new_tokens` (P = padded prompt length), then a
`jax.lax.while_loop` decodes one token per step for every row until
`max_new_tokens` tokens were produced or every row has emitted an EOS id.
Nothing runs on the host per token.

Positions follow `transformers`: the real tokens of each row start at
position 0 (`model.positions_from_mask`), padding is never attended to.

Attention masks are `AttnMeta` key ranges over the cache slots:

* prefill, ``prefill_attention="causal"``: query i sees [first real slot, i].
* prefill, ``prefill_attention="glm_bidir"``: the prompt is ONE bidirectional
  context block (``attention_meta`` with an all-zero loss mask): every real
  prompt token sees every real prompt token.
* decode (both modes): the query written at cache slot t sees
  [first real slot of its row, t].

Attention implementation: the prefill runs `cfg.attention_impl` ("blockwise":
memory-efficient, the P x (P + N) scores are never built, which long prompts
(16K-128K tokens) need; "dense": one masked einsum, fine for short prompts).
Decode steps always use dense attention (`DECODE_ATTENTION_IMPL`): a step has
one query row, so its scores are [B, H, 1, P + N], linear in the length, and
one einsum beats a sequential loop over key blocks.

`generate` is the host-level convenience wrapper: lists of token ids in, lists
of completion ids out (up to and including the first EOS, as `transformers`
keeps it).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from focusft_jax.attention import AttnMeta, attention_meta
from focusft_jax.model import (
    ModelConfig,
    Params,
    embed,
    final_norm,
    lm_logits,
    positions_from_mask,
    run_layers,
    split_layers,
)

PREFILL_ATTENTIONS = ("causal", "glm_bidir")
DECODE_ATTENTION_IMPL = "dense"


class GenerateOutput(NamedTuple):
    """Result of `generate_tokens`.

    tokens: int32 [B, max_new_tokens]; the generated ids. After a row's first
        EOS (which is kept) and after the loop stopped early, entries are pad_id.
    lengths: int32 [B]; number of meaningful tokens per row (up to and
        including the first EOS, else max_new_tokens).
    finished: bool [B]; whether the row emitted an EOS.
    steps: int32 []; number of decode steps that ran (tokens[:, steps:] is pad).
    """

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array
    steps: jax.Array


def bucket_length(n: int, minimum: int = 16, linear_above: int = 512) -> int:
    """Padded prompt length for n tokens: the next power of two (at least
    `minimum`) up to `linear_above`, then the next multiple of `linear_above`.
    Bounds the number of distinct shapes (hence compilations)."""
    if n <= 0:
        raise ValueError(f"prompt length must be positive, got {n}")
    if n > linear_above:
        return -(-n // linear_above) * linear_above
    b = minimum
    while b < n:
        b *= 2
    return b


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    top_k: jax.Array | int,
) -> jax.Array:
    """Samples one token id per row from float32 logits [B, V].

    Order as in `transformers`: divide by temperature, keep the top_k largest
    (top_k <= 0: no limit), then keep the smallest set of most likely tokens
    whose probability mass reaches top_p (the most likely token is always
    kept, so a tiny top_p is greedy). Returns int32 [B].
    """
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    # Stable ascending sort of -logits: ties keep the lower id first, so the
    # first sorted entry is exactly argmax(logits).
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab, dtype=jnp.int32)
    top_k = jnp.asarray(top_k, jnp.int32)
    keep = (top_k <= 0) | (rank < top_k)
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < jnp.asarray(top_p, jnp.float32))
    keep = keep | (rank == 0)
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, masked, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _prefill_meta(attention_mask: jax.Array, prefill_attention: str) -> AttnMeta:
    if prefill_attention == "causal":
        return attention_meta(attention_mask, kind="causal")
    if prefill_attention == "glm_bidir":
        return attention_meta(attention_mask, jnp.zeros_like(attention_mask), kind="glm_bidir")
    raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTIONS}, got {prefill_attention!r}")


def generate_tokens(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array | int,
    key: jax.Array | None = None,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
    *,
    max_new_tokens: int,
    sample: bool = False,
    prefill_attention: str = "causal",
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens for a batch of left-padded prompts.

    tokens: int [B, P] prompt ids, LEFT-padded (the real tokens of each row
        end at column P - 1; padding ids are arbitrary).
    attention_mask: [B, P], 1 on real tokens, 0 on padding. Every row needs
        at least one real token.
    eos_ids: int32 [E] ids that end a row (E may be 0: never stop early).
    pad_id: id emitted by rows that have finished.
    key: PRNG key, only used when `sample` is True.
    temperature, top_p, top_k: sampling parameters (traced: changing them does
        not recompile); see `sample_logits`. Ignored when `sample` is False.
    max_new_tokens, sample, prefill_attention: static. `sample=False` is
        greedy (argmax). `prefill_attention` in {"causal", "glm_bidir"}.

    The prefill uses `cfg.attention_impl` (set "blockwise" for long prompts:
    dense builds [B, H, P, P + N] float32 scores per layer); decode steps use
    dense attention (one query row).

    The cache holds P + max_new_tokens slots: one (k, v) pair of
    [B, P + N, Hkv, hd] per layer, in the compute dtype. Layers run unrolled
    (`model.run_layers`' cache mode over `split_layers`) so a decode step
    reads each layer's weights and cache in place. Logits are float32 and computed only for the last
    prompt position during prefill. Returns a `GenerateOutput`.

    Arguments are canonicalised (int32 ids, float32 sampling scalars, a
    default key) before the jitted program is looked up, so Python scalars,
    numpy and jax arrays share one compilation per shape.
    """
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_attention not in PREFILL_ATTENTIONS:
        raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTIONS}, got {prefill_attention!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if tokens.ndim != 2 or tokens.shape != attention_mask.shape:
        raise ValueError(
            f"tokens and attention_mask must both be [B, P], got {tokens.shape} and {attention_mask.shape}"
        )
    sample = bool(sample)
    if sample and key is None:
        raise ValueError("sampling needs a PRNG key")
    if sample and isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature} (use sample=False for greedy)")
    if not sample:  # unused: fixed values keep one compiled program
        key, temperature, top_p, top_k = None, 1.0, 1.0, 0
    return _generate_jit(
        cfg,
        params,
        tokens,
        attention_mask,
        jnp.asarray(eos_ids, jnp.int32).reshape(-1),
        jnp.asarray(pad_id, jnp.int32),
        jax.random.PRNGKey(0) if key is None else key,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        max_new_tokens=max_new_tokens,
        sample=sample,
        prefill_attention=prefill_attention,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sample", "prefill_attention"))
def _generate_jit(
    cfg, params, tokens, mask, eos_ids, pad_id, key, temperature, top_p, top_k, *, max_new_tokens, sample,
    prefill_attention,
):
    bsz, plen = tokens.shape
    total = plen + max_new_tokens
    prompt_len = jnp.sum(mask, axis=-1)  # [B]
    first_real = plen - prompt_len  # [B] first real cache slot (left padding)

    def pick(logits, step):
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p, top_k)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    # Per-layer weights and caches, sliced once outside the decode loop, so
    # that no step copies a layer's weights or cache out of a stacked array.
    layers = split_layers(params["layers"], cfg.num_layers)
    zeros = jnp.zeros((bsz, total, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
    caches = tuple((zeros, zeros) for _ in range(cfg.num_layers))
    decode_cfg = cfg.replace(attention_impl=DECODE_ATTENTION_IMPL)

    def forward_cached(caches, tokens, positions, meta, index, lcfg=cfg):
        """Runs tokens [B, S] written at cache slots index..index+S-1 with the
        attention implementation of `lcfg`; returns (final-normed hidden
        states of the last input position [B, D], caches)."""
        x = embed(cfg, params, tokens)
        x, caches = run_layers(lcfg, layers, x, positions, meta, cache=(caches, index))
        return final_norm(cfg, params, x[:, -1]), caches

    # ---- prefill: the whole prompt in one forward (cfg.attention_impl), writing cache slots 0..P-1
    meta = _prefill_meta(mask, prefill_attention)
    h, caches = forward_cached(caches, tokens, positions_from_mask(mask), meta, jnp.asarray(0, jnp.int32))
    tok = pick(lm_logits(cfg, params, h), 0)  # logits [B, V] float32, last position only
    done = is_eos(tok)
    out = jnp.full((bsz, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    lengths = jnp.ones((bsz,), jnp.int32)

    # ---- decode: step i feeds token i-1 at slot P+i-1 and produces token i
    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, caches, prev, done, out, lengths = state
        slot = plen + step - 1
        pos = (prompt_len + step - 1)[:, None]
        meta = AttnMeta(kv_start=first_real[:, None], kv_end=jnp.full((bsz, 1), slot + 1, jnp.int32))
        h, caches = forward_cached(caches, prev[:, None], pos, meta, slot, decode_cfg)
        tok = pick(lm_logits(cfg, params, h), step)
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_eos(tok)
        return step + 1, caches, tok, done, out, lengths

    state = (jnp.asarray(1, jnp.int32), caches, tok, done, out, lengths)
    steps, _, _, done, out, lengths = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=out, lengths=lengths, finished=done, steps=steps)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token-id lists to `length` (default: bucket_length of the
    longest). Returns (tokens int32 [B, length], attention_mask int32 [B, length])."""
    if not prompts:
        raise ValueError("no prompts")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    length = bucket_length(longest) if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest prompt ({longest})")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = np.asarray(p, np.int32)
            mask[i, length - len(p):] = 1
    return tokens, mask


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | jax.Array = 0,
    prefill_attention: str = "causal",
    pad_to: int | None = None,
) -> list[list[int]]:
    """Host-level batched generation: one list of prompt ids per row in, one
    list of completion ids per row out (up to and including the first EOS id,
    else exactly `max_new_tokens` ids).

    eos_ids: an id, a list of ids, or None (never stop early). pad_id: the
    id used for left padding and for rows that have finished.
    temperature 0 is greedy; temperature > 0 samples with top_p / top_k from
    `seed` (an int, or a jax PRNG key). Prompts are left-padded to
    `bucket_length` of the longest (or to `pad_to`), so batches of similar
    length reuse one compiled program.
    """
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_ids is None:
        eos = []
    elif isinstance(eos_ids, (int, np.integer)):
        eos = [int(eos_ids)]
    else:
        eos = [int(e) for e in eos_ids]
    tokens, mask = left_pad(prompts, pad_id, pad_to)
    sample = temperature > 0
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(int(seed))
    res = generate_tokens(
        cfg,
        params,
        tokens,
        mask,
        eos,
        pad_id,
        key,
        temperature,
        top_p,
        top_k,
        max_new_tokens=max_new_tokens,
        sample=sample,
        prefill_attention=prefill_attention,
    )
    out = np.asarray(res.tokens)
    lengths = np.asarray(res.lengths)
    return [out[i, : lengths[i]].tolist() for i in range(len(prompts))]

"""Attention masks as per-token metadata, and the attention implementations.

Every mask this project uses (causal, glm_bidir, packed segments, left or right
padding, a KV cache during decoding) has the same shape: each query sees one
contiguous range of keys. So a mask is described by two integers per query,

    kv_start[b, i] <= j < kv_end[b, i]   (key j visible to query i)

and no S x S array is ever built outside the dense reference implementation.

glm_bidir (METHOD.md): a *turn* is a maximal run of equal `loss_mask` values
inside one packed example. Query i sees every earlier turn of its example, its
whole own turn when that turn has loss 0 (context: bidirectional), and its own
turn up to itself when the turn has loss 1 (assistant: causal). So
`kv_start` is the start of i's example and `kv_end` is either the end of i's
turn (loss 0) or i + 1 (loss 1). `causal` is the same with `kv_end = i + 1`
everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

ATTENTION_KINDS = ("glm_bidir", "causal")


@struct.dataclass
class AttnMeta:
    """Per-query visible key range: key j is visible to query i iff
    `kv_start[b, i] <= j < kv_end[b, i]`.

    kv_start, kv_end: int32 [B, S]. Key indices are positions in the key axis
    (the same axis as the queries in training; the KV cache axis in decoding).
    Padding queries get the range [i, i + 1) so that no row is empty.
    """

    kv_start: jax.Array
    kv_end: jax.Array


def _reverse_cummin(x: jax.Array) -> jax.Array:
    return jnp.flip(jax.lax.cummin(jnp.flip(x, axis=-1), axis=x.ndim - 1), axis=-1)


def attention_meta(
    attention_mask: jax.Array,
    loss_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kind: str = "glm_bidir",
) -> AttnMeta:
    """Builds the per-query key ranges for `kind` in {"glm_bidir", "causal"}.

    attention_mask: [B, S], 1 on real tokens, 0 on padding (left or right).
    loss_mask: [B, S], 1 on assistant (trained) tokens; required for glm_bidir.
    segment_ids: [B, S] optional packed-example ids; tokens attend only within
        their own contiguous run of equal segment id.
    Both the inner and outer loops of FocuSFT and generation call this one
    function, so the mask is defined in exactly one place.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    real = attention_mask.astype(bool)
    bsz, seq = real.shape
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
    seg = jnp.zeros((bsz, seq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    first = idx == 0
    prev_real = jnp.pad(real[:, :-1], ((0, 0), (1, 0)))
    prev_seg = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    # An example starts at a real token whose predecessor is padding, another
    # example, or nothing.
    example_start = real & (first | ~prev_real | (prev_seg != seg))
    kv_start = jax.lax.cummax(jnp.where(example_start, idx, 0), axis=1)
    kv_end = idx + 1
    if kind == "glm_bidir":
        if loss_mask is None:
            raise ValueError("glm_bidir attention needs a loss_mask")
        lm = loss_mask.astype(bool)
        prev_lm = jnp.pad(lm[:, :-1], ((0, 0), (1, 0)))
        turn_start = example_start | (real & (lm != prev_lm)) | (~real & prev_real)
        # End of i's turn = index of the next turn start after i (or S).
        next_start = jnp.where(turn_start, idx, seq)
        next_start = jnp.pad(next_start[:, 1:], ((0, 0), (0, 1)), constant_values=seq)
        turn_end = _reverse_cummin(next_start)
        kv_end = jnp.where(lm, idx + 1, turn_end)
    kv_start = jnp.where(real, kv_start, idx)
    kv_end = jnp.where(real, kv_end, idx + 1)
    return AttnMeta(kv_start=kv_start.astype(jnp.int32), kv_end=kv_end.astype(jnp.int32))


def dense_mask(meta: AttnMeta, num_keys: int) -> jax.Array:
    """The boolean [B, S, T] mask of `meta` (reference and tests only)."""
    j = jnp.arange(num_keys, dtype=jnp.int32)
    return (j >= meta.kv_start[..., None]) & (j < meta.kv_end[..., None])


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttnMeta, scale: float) -> jax.Array:
    """Reference attention with an explicit mask.

    q: [B, S, Hq, D]; k, v: [B, T, Hkv, D] with Hq a multiple of Hkv (GQA);
    meta: ranges over the T keys. Returns [B, S, Hq, D] in q's dtype. Softmax is
    computed in float32 (as `transformers` does). A query with an empty range
    gets a zero output rather than NaN.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, s, hkv, hq // hkv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    mask = dense_mask(meta, k.shape[1])[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v)
    return out.reshape(b, s, hq, d)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttnMeta, scale: float) -> jax.Array:
    """Memory-efficient attention (online softmax over key blocks, masked
    blocks skipped, custom VJP from the saved log-sum-exp); same contract as
    `dense_attention`. See `focusft_jax.blockwise`."""
    from focusft_jax.blockwise import blockwise_attention as flash

    return flash(q, k, v, meta.kv_start, meta.kv_end, scale)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttnMeta, scale: float) -> jax.Array:
    """Flash attention as Pallas kernels (Triton on GPU, Mosaic on TPU,
    interpret mode on CPU); same contract as `dense_attention`. See
    `focusft_jax.pallas_attention`."""
    from focusft_jax.pallas_attention import pallas_attention as flash

    return flash(q, k, v, meta.kv_start, meta.kv_end, scale)


def auto_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttnMeta, scale: float) -> jax.Array:
    """`pallas_attention` when JAX's default backend is a GPU (Triton
    kernels) or a TPU (Mosaic kernels), else `blockwise_attention` (CPU,
    where Pallas would only interpret). Both compute the same function; the
    choice is made when the function is traced."""
    impl = pallas_attention if jax.default_backend() in ("gpu", "tpu") else blockwise_attention
    return impl(q, k, v, meta, scale)


ATTENTION_IMPLS = {
    "dense": dense_attention,
    "blockwise": blockwise_attention,
    "pallas": pallas_attention,
    "auto": auto_attention,
}


def attend(q, k, v, meta: AttnMeta, scale: float, impl: str = "dense") -> jax.Array:
    """Dispatches to the attention implementation named `impl`."""
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(f"attention implementation {impl!r} is not one of {sorted(ATTENTION_IMPLS)}") from None
    return fn(q, k, v, meta, scale)

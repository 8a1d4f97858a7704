"""Decoder forward for the Llama / Llama-3 / Qwen2 / Qwen2.5 / Qwen3 / Mistral family.

The model is a set of pure functions over a params pytree (no module graph is
traversed per call). Parameters use Hugging Face names and layouts, so import
and export are a name table and transposes:

    params = {
      "embed_tokens": {"embedding": [V, D]},
      "layers": {                              # stacked: leading axis = layer
        "input_layernorm": {"scale": [L, D]},
        "q_proj": {"kernel": [L, D, Hq*hd], "bias": [L, Hq*hd]},   # bias if qkv_bias
        "k_proj": {"kernel": [L, D, Hkv*hd], ...}, "v_proj": ...,
        "o_proj": {"kernel": [L, Hq*hd, D]},                       # bias if o_bias
        "q_norm": {"scale": [L, hd]}, "k_norm": ...,               # Qwen3 only
        "post_attention_layernorm": {"scale": [L, D]},
        "gate_proj": {"kernel": [L, D, F]}, "up_proj": ..., "down_proj": {"kernel": [L, F, D]},
      },
      "norm": {"scale": [D]},
      "lm_head": {"kernel": [D, V]},           # absent with tied embeddings
    }

Kernels are stored (in, out), the transpose of torch's Linear weight. Layers
are stacked; `run_layers` is the one runner of the stack (any range of layers
[lo, hi), indexed in place, with fast weights, an attention probe, VJP tapes
for the fused first_order engine, or a KV cache for generation). It runs the
layers with `jax.lax.scan`, so compile time does not grow with depth, and
`cfg.remat` sets what each layer's backward saves.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from focusft_jax.attention import AttnMeta, attend
from focusft_jax.errors import ConfigError

Params = dict[str, Any]

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture and numerics of a decoder. Hashable: pass it as a
    static argument to jitted functions.

    Also the YAML `model.init:` section itself (a model built from scratch;
    config.py builds it from the field types): every architecture field has a
    default and its meaning as metadata "help" (`train.py --help-config`), and
    a field with metadata {"config": False} is not a key of that section (the
    numerics are keys of `model:`, applied with `replace`).
    An impossible value raises ConfigError (a ValueError) naming the field.

    vocab_size: None only in a config template ("the tokenizer's size", filled
    in before the model is built); param_shapes / init_params refuse None.
    head_dim: None resolves to hidden_size // num_heads.
    qkv_bias / qk_norm: None resolves from the family (Qwen2 has q/k/v
    biases, Qwen3 q/k RMSNorm, the others neither).
    rope_scaling: the Hugging Face rope parameters other than theta and type,
    as sorted (key, value) pairs (a dict would not be hashable).
    param_dtype / compute_dtype: "float32" or "bfloat16". Norms, RoPE, softmax
    and logits are computed in float32 whatever the compute dtype.
    attention_impl: a key of `attention.ATTENTION_IMPLS`.
    remat: activation checkpointing of each layer: "none", "full" (save only
    the layer input) or "dots" (save matmul outputs without batch dims).
    scan_layers: run the stacked layers with a rolled `lax.scan` (compile time
    independent of depth). False unrolls it: XLA's cost analysis counts a loop
    body once, so FLOP counts need the unrolled program.
    """

    family: Literal[FAMILIES] = dataclasses.field(default="qwen2", metadata={"help": "architecture family"})
    vocab_size: int | None = dataclasses.field(
        default=None,
        metadata={"help": "vocabulary size", "default": "the tokenizer's size"},
    )
    hidden_size: int = dataclasses.field(default=128, metadata={"help": "model width"})
    intermediate_size: int = dataclasses.field(default=384, metadata={"help": "MLP width"})
    num_layers: int = dataclasses.field(default=4, metadata={"help": "decoder layers"})
    num_heads: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    num_kv_heads: int = dataclasses.field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    head_dim: int | None = dataclasses.field(
        default=None,
        metadata={"help": "width of a head", "default": "hidden_size / num_heads"},
    )
    rms_norm_eps: float = dataclasses.field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = dataclasses.field(default=10000.0, metadata={"help": "RoPE base"})
    # Not YAML keys: a RoPE variant needs rope_scaling's parameters (set from an imported config.json).
    rope_type: Literal[ROPE_TYPES] = dataclasses.field(default="default", metadata={"config": False})
    rope_scaling: tuple = dataclasses.field(default=(), metadata={"config": False})
    max_position_embeddings: int = dataclasses.field(
        default=32768,
        metadata={"help": "the longest context the model is built for"},
    )
    tie_word_embeddings: bool = dataclasses.field(
        default=False,
        metadata={"help": "the output head shares the input embedding"},
    )
    qkv_bias: bool | None = dataclasses.field(
        default=None,
        metadata={"help": "biases on the q/k/v projections", "default": "true for qwen2"},
    )
    o_bias: bool = dataclasses.field(default=False, metadata={"help": "bias on the attention output projection"})
    mlp_bias: bool = dataclasses.field(default=False, metadata={"help": "biases on the MLP projections"})
    qk_norm: bool | None = dataclasses.field(
        default=None,
        metadata={"help": "RMSNorm of queries and keys", "default": "true for qwen3"},
    )
    sliding_window: int | None = dataclasses.field(
        default=None,
        metadata={"help": "sliding-window attention span in tokens; null: full attention"},
    )
    # Numerics: keys of the YAML `model:` section, not of `model.init:`.
    param_dtype: Literal[DTYPES] = dataclasses.field(default="float32", metadata={"config": False})
    compute_dtype: Literal[DTYPES] = dataclasses.field(default="float32", metadata={"config": False})
    attention_impl: str = dataclasses.field(default="dense", metadata={"config": False})
    remat: Literal[REMAT_POLICIES] = dataclasses.field(default="none", metadata={"config": False})
    scan_layers: bool = dataclasses.field(default=True, metadata={"config": False})

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family: model family {self.family!r} is not supported; supported: {list(FAMILIES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type: rope type {self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        for key in sizes:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"{key}: must be one of {list(DTYPES)}, got {getattr(self, key)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat: must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        # Resolve the defaults that depend on other fields (frozen: object.__setattr__).
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"head_dim: hidden_size ({self.hidden_size}) is not a multiple of num_heads "
                    f"({self.num_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.family == "qwen2")
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", self.family == "qwen3")

    @property
    def rope_params(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- parameters


def param_shapes(cfg: ModelConfig) -> Params:
    """The params pytree of `cfg` as shapes (tuples), the single source of the layout."""
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size is None (a config template's 'the tokenizer's size'); set it first")
    L, D, F, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layers: Params = {
        "input_layernorm": {"scale": (L, D)},
        "q_proj": {"kernel": (L, D, q)},
        "k_proj": {"kernel": (L, D, kv)},
        "v_proj": {"kernel": (L, D, kv)},
        "o_proj": {"kernel": (L, q, D)},
        "post_attention_layernorm": {"scale": (L, D)},
        "gate_proj": {"kernel": (L, D, F)},
        "up_proj": {"kernel": (L, D, F)},
        "down_proj": {"kernel": (L, F, D)},
    }
    if cfg.qkv_bias:
        for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            layers[name]["bias"] = (L, width)
    if cfg.o_bias:
        layers["o_proj"]["bias"] = (L, D)
    if cfg.mlp_bias:
        for name, width in (("gate_proj", F), ("up_proj", F), ("down_proj", D)):
            layers[name]["bias"] = (L, width)
    if cfg.qk_norm:
        layers["q_norm"] = {"scale": (L, hd)}
        layers["k_norm"] = {"scale": (L, hd)}
    params: Params = {
        "embed_tokens": {"embedding": (cfg.vocab_size, D)},
        "layers": layers,
        "norm": {"scale": (D,)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": (D, cfg.vocab_size)}
    return params


_LOGICAL_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("norm", "scale"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("input_layernorm", "scale"): ("layers", "norm"),
    ("post_attention_layernorm", "scale"): ("layers", "norm"),
    ("q_norm", "scale"): ("layers", "head_dim"),
    ("k_norm", "scale"): ("layers", "head_dim"),
    ("q_proj", "kernel"): ("layers", "embed", "q_heads"),
    ("q_proj", "bias"): ("layers", "q_heads"),
    ("k_proj", "kernel"): ("layers", "embed", "kv_heads"),
    ("k_proj", "bias"): ("layers", "kv_heads"),
    ("v_proj", "kernel"): ("layers", "embed", "kv_heads"),
    ("v_proj", "bias"): ("layers", "kv_heads"),
    ("o_proj", "kernel"): ("layers", "q_heads", "embed"),
    ("o_proj", "bias"): ("layers", "embed"),
    ("gate_proj", "kernel"): ("layers", "embed", "mlp"),
    ("gate_proj", "bias"): ("layers", "mlp"),
    ("up_proj", "kernel"): ("layers", "embed", "mlp"),
    ("up_proj", "bias"): ("layers", "mlp"),
    ("down_proj", "kernel"): ("layers", "mlp", "embed"),
    ("down_proj", "bias"): ("layers", "embed"),
}


def logical_axes(cfg: ModelConfig) -> Params:
    """Same structure as the params, each leaf a tuple of logical axis names
    (one per dimension), for `flax.linen.logical_to_mesh_sharding`."""

    def name(path, shape):
        key = (path[-2].key, path[-1].key)
        axes = _LOGICAL_AXES[key]
        assert len(axes) == len(shape), (key, axes, shape)
        return axes

    return jax.tree_util.tree_map_with_path(name, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random parameters: normal(0, std) matrices, unit norms, zero biases."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out = []
    for (path, shape), key in zip(leaves, keys):
        leaf = path[-1].key
        if leaf == "scale":
            out.append(jnp.ones(shape, dtype))
        elif leaf == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as `transformers` computes it: statistics in float32, the
    normalised input cast back to x's dtype before the scale multiplies."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    normed = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale for
    the config's rope type, computed as `transformers` computes them."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    p = cfg.rope_params
    if cfg.rope_type == "default":
        return inv, 1.0
    if cfg.rope_type == "linear":
        return (inv / np.float32(p["factor"])).astype(np.float32), 1.0
    if cfg.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
        low_wl, high_wl = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / factor + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
    if cfg.rope_type == "yarn":
        orig = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
        factor = p.get("factor")
        if factor is None:
            factor = cfg.max_position_embeddings / orig

        def mscale_of(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = p.get("attention_factor")
        if attn_factor is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                attn_factor = mscale_of(factor, p["mscale"]) / mscale_of(factor, p["mscale_all_dim"])
            else:
                attn_factor = mscale_of(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def correction_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
        extra_factor = (1 - ramp).astype(np.float32)
        pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
        inv_extra = (1.0 / pos_freqs).astype(np.float32)
        inv_inter = (1.0 / (factor * pos_freqs)).astype(np.float32)
        inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
        return inv.astype(np.float32), float(attn_factor)
    raise AssertionError(cfg.rope_type)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, S, head_dim] (float32) for integer positions [B, S]."""
    inv, scale = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, S, H, hd]; cos, sin: [B, S, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def linear(x: jax.Array, p: Params, fast: Params | None = None, fast_scale: float = 1.0) -> jax.Array:
    """y = x W (+ b) (+ fast_scale * (x A^T) B^T).

    x: [B, S, in]; p["kernel"]: [in, out]. Fast weights (METHOD.md's transient
    LoRA) are {"A": [r, in], "B": [out, r]} shared by the batch, or with a
    leading example axis {"A": [B, r, in], "B": [B, out, r]}.
    """
    y = _matmul(x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if fast is not None:
        a, b = fast["A"].astype(x.dtype), fast["B"].astype(x.dtype)
        if a.ndim == 2:
            low = jnp.einsum("bsi,ri->bsr", x, a)
            y = y + fast_scale * jnp.einsum("bsr,or->bso", low, b)
        else:
            low = jnp.einsum("bsi,bri->bsr", x, a)
            y = y + fast_scale * jnp.einsum("bsr,bor->bso", low, b)
    return y


# ---------------------------------------------------------------- the decoder


def _check_window(cfg: ModelConfig, num_keys: int) -> None:
    if cfg.sliding_window is not None and num_keys > cfg.sliding_window:
        raise ValueError(
            f"sequence of {num_keys} keys exceeds the model's sliding_window ({cfg.sliding_window}); "
            "sliding-window attention is not implemented, so keep sequences within the window"
        )


def decoder_layer(
    cfg: ModelConfig,
    lp: Params,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    meta: AttnMeta,
    fast: Params | None = None,
    fast_scale: float = 1.0,
    kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    probe=None,
    query_index: jax.Array | None = None,
):
    """One pre-norm decoder layer. x: [B, S, D] in the compute dtype.

    kv: optional (k_cache [B, T, Hkv, hd], v_cache, index): this input's keys and
    values are written at slots index..index+S-1 and the queries attend over
    the whole cache (meta ranges over T).
    probe: optional fn(q [B,S,Hq,hd], k [B,T,Hkv,hd], meta) -> pytree, called
    with the post-RoPE queries and keys (attention diagnostics).
    query_index: optional int [B, P]: compute the layer's output only at these
    positions (keys and values still come from all S): returns x [B, P, D],
    equal to the full layer's output gathered there. For the last layer of a
    training step, whose output is only read at the loss positions.
    Returns (x, side) with side = {"kv": (k_cache, v_cache)} and/or
    {"probe": ...} for what was asked.
    """
    b, s, _ = x.shape
    fast = fast or {}

    def proj(name, h):
        return linear(h, lp[name], fast.get(name), fast_scale)

    h = rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    k = proj("k_proj", h).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = proj("v_proj", h).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    cos_q, sin_q = cos, sin
    if query_index is not None:
        at = lambda a: jnp.take_along_axis(a, query_index.reshape(query_index.shape + (1,) * (a.ndim - 2)), axis=1)
        x, h, cos_q, sin_q = at(x), at(h), at(cos), at(sin)
        meta = AttnMeta(at(meta.kv_start), at(meta.kv_end))
    q = proj("q_proj", h).reshape(b, h.shape[1], cfg.num_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"]["scale"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"]["scale"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
    side = {}
    if kv is not None:
        k_cache, v_cache, index = kv
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        k, v = k_cache, v_cache
        side["kv"] = (k_cache, v_cache)
    _check_window(cfg, k.shape[1])
    if probe is not None:
        side["probe"] = probe(q, k, meta)
    attn = attend(q, k, v, meta, cfg.head_dim**-0.5, cfg.attention_impl)
    x = x + proj("o_proj", attn.reshape(b, q.shape[1], cfg.num_heads * cfg.head_dim))
    h = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    h = jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h)
    x = x + proj("down_proj", h)
    return x, side


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out], as `x @ w`, with a hand-written backward.

    The weight gradient contracts the token axes of x and of the output
    cotangent dy. XLA:CPU's matmul wants the contracted axis of its left
    operand minor, so one of the two gets a transposed copy; JAX's own
    transpose rule makes it dy, also when dy is the larger one (the FFN's
    [S, F] against x's [S, D]), and that copy, fused with the elementwise
    backward that produces dy, was the costliest non-matmul op of a
    training step. Here the smaller operand is the one transposed. Both
    rules are plain dot_generals, so this differentiates to any order in
    reverse mode (the `full` meta-gradient).
    """
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    batch = tuple(range(x.ndim - 1))
    if x.shape[-1] <= dy.shape[-1]:
        dw = jax.lax.dot_general(x, dy, ((batch, batch), ((), ())))
    else:
        dw = jax.lax.dot_general(dy, x, ((batch, batch), ((), ()))).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def remat_layer(cfg: ModelConfig, fn):
    """`fn` checkpointed per `cfg.remat` ("none": unchanged; "full": only its
    inputs saved; "dots": matmul outputs without batch dims saved)."""
    if cfg.remat == "none":
        return fn
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return jax.checkpoint(fn, policy=policy)


def layer_params(layers: Params, i) -> Params:
    """Layer i (a Python or traced int) of a stacked layer pytree, read in
    place (a dynamic index, never a slice of the stack)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), layers)


def split_layers(layers: Params, num_layers: int) -> list[Params]:
    """The stacked layers as a list of per-layer pytrees (for `run_layers`'
    KV-cache mode: a decode loop then reads each layer's weights in place)."""
    return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)]


class Tape(NamedTuple):
    """VJP residuals of layers lo..hi-1 (`run_layers(tape=True)`), replayed by
    `stack_backward`: `saved` (stacked over the layers) and the static recipe
    that rebuilds a layer's VJP function from them and from what the
    backward re-reads instead of saving (the layer's parameters, the rope,
    the mask, its fast weights)."""

    saved: tuple
    recipe: tuple
    treedef: Any


def layer_fn(cfg: ModelConfig, fast_scale: float, query_index: jax.Array | None = None):
    """One decoder layer as f(lp, x, (cos, sin, meta, fast)) -> x, checkpointed
    per `cfg.remat`: the function whose VJP `run_layers(tape=True)` records.
    With `query_index` [B, P] its output only at those positions."""

    def layer(lp, x, inv):
        cos, sin, meta, fl = inv
        return decoder_layer(cfg, lp, x, cos, sin, meta, fl, fast_scale, query_index=query_index)[0]

    return remat_layer(cfg, layer)


def run_layers(
    cfg: ModelConfig,
    layers: Params,
    x: jax.Array,
    positions: jax.Array | None,
    meta: AttnMeta,
    *,
    lo: int = 0,
    hi: int | None = None,
    fast: Params | None = None,
    fast_scale: float = 1.0,
    probe=None,
    tape: bool = False,
    cache=None,
    rope: tuple[jax.Array, jax.Array] | None = None,
):
    """The decoder stack: layers lo..hi-1 (default all) of the full stack.
    Training, the fused first_order engine, generation and diagnostics all
    run the stack here.

    x: [B, S, D]; positions: [B, S] int (or None with `rope` = (cos, sin) of
    them, `rope_cos_sin`); meta: key ranges of the S queries. fast: optional
    fast weights stacked over the hi - lo layers ({proj: {"A": [n, ...],
    "B": [n, ...]}}), applied with `fast_scale` = alpha / rank.

    At most one of what a caller may ask for:
    probe: fn(q, k, meta) -> pytree (see `decoder_layer`): returns
        (x, per-layer probe outputs stacked over the layers).
    tape: returns (x, Tape), the layers' VJP residuals for `stack_backward`
        (reverse mode written out per layer: the fused engine's form).
    cache: (kv, index), kv one (k, v) pair [B, T, Hkv, hd] per layer lo..hi-1:
        this input is written at cache slots index..index+S-1 and attends
        over all T slots (meta ranges over T); returns (x, new kv). The
        layers run unrolled, and `layers` may be `split_layers`' list, so
        that a decode loop reads each layer's weights and cache in place.
    Otherwise returns x. The scan path is differentiable to any order in
    reverse and forward mode; `cfg.remat` sets what its backward saves, and
    `cfg.scan_layers = False` unrolls it.
    """
    hi = cfg.num_layers if hi is None else hi
    if sum((probe is not None, tape, cache is not None)) > 1:
        raise ValueError("run_layers: ask for at most one of probe, tape and cache")
    cos, sin = rope_cos_sin(cfg, positions) if rope is None else rope

    if cache is not None:
        kv, index = cache
        new = []
        for n, i in enumerate(range(lo, hi)):
            lp = layers[i] if isinstance(layers, (list, tuple)) else layer_params(layers, i)
            fl = None if fast is None else jax.tree.map(lambda a: a[n], fast)
            x, side = decoder_layer(cfg, lp, x, cos, sin, meta, fl, fast_scale, kv=(*kv[n], index))
            new.append(side["kv"])
        return x, tuple(new)

    idx = jnp.arange(lo, hi, dtype=jnp.int32)
    unroll = not cfg.scan_layers
    if tape:
        box = {}
        f = layer_fn(cfg, fast_scale)

        def body(h, xs):
            i, fl = xs
            lp = layer_params(layers, i)
            inv = (cos, sin, meta, fl)
            y, vjp = jax.vjp(f, lp, h, inv)
            leaves, treedef = jax.tree.flatten(vjp)
            # Residuals that are this layer's inputs (other than h) are re-read in
            # the backward, not stacked (stacking the parameters would copy them).
            known = {id(a): n for n, a in enumerate(jax.tree.leaves((lp, inv)))}
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

        x, saved = jax.lax.scan(body, x, (idx, fast), unroll=unroll)
        return x, Tape(saved, box["recipe"], box["treedef"])

    # Under autodiff, a sub-range is sliced out of the stack (a copy of its
    # weights) rather than indexed in the loop: indexing measured worse for
    # the `full` meta-gradient (+12% temp memory, every transposed loop then
    # accumulates a whole [L] gradient) and within 2% for the rest. The
    # tape path above indexes, since it writes its gradient rows itself.
    whole = (lo, hi) == (0, cfg.num_layers)
    stack = layers if whole else jax.tree.map(lambda a: a[lo:hi], layers)

    def body(h, xs):
        lp, fl = xs
        h, side = decoder_layer(cfg, lp, h, cos, sin, meta, fl, fast_scale, probe=probe)
        return h, side.get("probe")

    x, probed = jax.lax.scan(remat_layer(cfg, body), x, (stack, fast), unroll=unroll)
    return (x, probed) if probe is not None else x


def stack_backward(
    cfg: ModelConfig,
    layers: Params,
    dx: jax.Array,
    tape: Tape,
    positions: jax.Array | None,
    meta: AttnMeta,
    *,
    lo: int = 0,
    hi: int | None = None,
    fast: Params | None = None,
    grads: Params | None = None,
    need_dx: bool = True,
    rope: tuple[jax.Array, jax.Array] | None = None,
):
    """Reverse pass through layers hi-1..lo of `run_layers(..., tape=True)`.

    dx: cotangent of the stack's output; positions / rope, meta, fast: as
    given to the forward. grads: optional [L] parameter-gradient buffer
    (like `layers`); layer i's gradient is written, in place, at row i.

    need_dx=False: the cotangent of the stack's input is not wanted (e.g.
    nothing below layer lo has fast weights), so layer lo's iteration takes
    a branch without it and XLA drops what only that cotangent needed (with
    the FFN fast-weight targets, the whole attention backward of layer lo).
    A branch inside the loop rather than layer lo peeled off after it: XLA
    would run a peeled layer's rematerialised forward before the loop and
    hold its buffers through it. What no caller uses (e.g. the base-weight
    gradient when only the fast weights' is read) is never computed: XLA
    drops it from the loop body.

    Returns (dx of the stack's input (zeros with need_dx=False), grads, the
    fast-weight gradient stacked like `fast` (None without fast weights)).
    """
    hi = cfg.num_layers if hi is None else hi
    cos, sin = rope_cos_sin(cfg, positions) if rope is None else rope

    def body(carry, xs):
        d, g = carry
        i, fl = xs
        lp = layer_params(layers, i)
        saved = [jax.lax.dynamic_index_in_dim(a, i - lo, 0, keepdims=False) for a in tape.saved]
        known = jax.tree.leaves((lp, (cos, sin, meta, fl)))
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


def embed(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, S, D] in the compute dtype."""
    return params["embed_tokens"]["embedding"][tokens].astype(cfg.dtype)


def final_norm(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    return rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps)


def lm_logits(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """float32 logits [..., V] of final-normed hidden states h [..., D]."""
    if cfg.tie_word_embeddings:
        w = params["embed_tokens"]["embedding"].T
    else:
        w = params["lm_head"]["kernel"]
    return jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    meta: AttnMeta,
    fast: Params | None = None,
    fast_scale: float = 1.0,
) -> jax.Array:
    """Full-sequence logits [B, S, V] (float32) of tokens [B, S].

    `fast` covers the top layers only when it has fewer layers than the model:
    its leading axis length n selects layers L-n..L-1.
    """
    x = embed(cfg, params, tokens)
    if fast is None:
        x = run_layers(cfg, params["layers"], x, positions, meta)
    else:
        start = cfg.num_layers - jax.tree.leaves(fast)[0].shape[0]
        rope = rope_cos_sin(cfg, positions)
        x = run_layers(cfg, params["layers"], x, None, meta, hi=start, rope=rope)
        x = run_layers(cfg, params["layers"], x, None, meta, lo=start, fast=fast, fast_scale=fast_scale, rope=rope)
    return lm_logits(cfg, params, final_norm(cfg, params, x))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions 0..n-1 over the real tokens of each row (left or right padding);
    padding gets position 0."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)

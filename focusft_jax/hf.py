"""Hugging Face checkpoint import and export (config.json + safetensors).

Import reads a local model directory or a hub id (downloaded with
`huggingface_hub.snapshot_download`, safetensors only). Pickle `.bin` weights
are refused, and no remote code is ever run. Export writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or
unexpected keys, laid out as the installed transformers' `save_pretrained`
writes one: config.json (the architecture's config class serializes it),
model.safetensors (or model-0000i-of-0000n.safetensors and an index when
sharded), generation_config.json, and the tokenizer files and chat template
copied from the source (model_max_length set to the model's context). The
export is atomic: a kill at any point leaves the previous or the new complete
directory (save_hf, recover_export).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from focusft_jax.errors import CheckpointError

from focusft_jax.model import ModelConfig, Params, param_shapes
from focusft_jax.training_record import FILENAME as TRAINING_RECORD
from focusft_jax.training_record import write_training_record

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

# Per-layer tensors: our name under params["layers"] -> HF module path inside a layer.
_LAYER_MODULES = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_TOP_MODULES = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass
class HFModel:
    """An imported model: static config, parameters, the source config.json
    (kept so export preserves keys we do not interpret), and the directory it
    came from (for tokenizer files)."""

    cfg: ModelConfig
    params: Params
    hf_config: dict[str, Any] = field(default_factory=dict)
    source_dir: Path | None = None


# ---------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers v4 or v5 layout).

    Raises CheckpointError naming the architecture, rope type or key that is
    unsupported. `overrides` set ModelConfig fields (dtypes, attention, remat).
    """
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object of model settings, got {type(hf).__name__}")
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    family = None
    for arch in archs:
        if arch in ARCHITECTURES:
            family = ARCHITECTURES[arch]
    if family is None and model_type in FAMILY_ARCH:
        family = model_type
    if family is None:
        raise CheckpointError(
            f"{source}: architecture {archs or model_type!r} is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise CheckpointError(f"{source}: missing required key {key!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        value = hf.get(key)
        if (key in ("num_key_value_heads", "head_dim") and value is None) or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            continue
        raise CheckpointError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{source}: per-layer-type rope parameters are not supported")
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; supported: default, linear, llama3, yarn"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0 or rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" in hf:
        rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
    attention_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_scaling=tuple(sorted(rope.items())) if rope_type != "default" else (),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2") or attention_bias,
        o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=sliding,
    )
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    kw["param_dtype"] = "bfloat16" if dtype == "bfloat16" else "float32"
    kw["compute_dtype"] = kw["param_dtype"]
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# Keys of an imported config.json that the export writes itself (or that
# name the source): the rope and dtype keys of either layout, the version.
_OWNED_CONFIG_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "_name_or_path",
                      "transformers_version", "architectures", "model_type")


def _transformers_v5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def hf_config_object(cfg: ModelConfig, base: dict[str, Any] | None = None):
    """The installed transformers' config object (LlamaConfig, Qwen2Config,
    ...) for `cfg`: the keys we own from `cfg`, every other key of `base` (the
    imported config.json: token ids, initializer_range, ...) passed along, and
    the architecture's defaults for the rest, as `save_pretrained` has them.
    transformers v5 takes rope_parameters (rope_theta and rope_type inside) and
    dtype; v4 takes rope_theta, rope_scaling and torch_dtype. Building the
    object needs no torch (transformers imports it only when installed)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in (base or {}).items() if k not in _OWNED_CONFIG_KEYS}
    kw.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.family in ("llama", "qwen3"):
        kw["attention_bias"] = cfg.o_bias or cfg.qkv_bias
    if cfg.family == "llama":
        kw["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        kw["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        # Our sliding window covers every layer (config_from_hf reads it so).
        kw["use_sliding_window"] = cfg.sliding_window is not None
        kw["sliding_window"] = cfg.sliding_window
        kw["layer_types"] = ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    rope = {"rope_type": cfg.rope_type, **cfg.rope_params}
    if _transformers_v5():
        kw.update(rope_parameters={"rope_theta": cfg.rope_theta, **rope}, dtype=cfg.param_dtype)
    else:  # pragma: no cover - CI runs transformers v5
        kw.update(rope_theta=cfg.rope_theta, rope_scaling=rope if cfg.rope_type != "default" else None,
                  torch_dtype=cfg.param_dtype)
    kw.pop("head_dim", None)
    config = AutoConfig.for_model(cfg.family, **kw)
    # head_dim is a key of the architectures that have it (Llama derives it
    # from hidden_size / heads); Qwen2 has none and reads it only when set.
    if "head_dim" in (base or {}) or getattr(config, "head_dim", cfg.hidden_size // cfg.num_heads) != cfg.head_dim:
        config.head_dim = cfg.head_dim
    config.architectures = [FAMILY_ARCH[cfg.family]]
    return config


def config_to_hf(cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict the export writes for `cfg`: what the installed
    transformers' `save_pretrained` writes for that config (its diff against
    the defaults, with transformers_version). Keys of `base` (the imported
    config) that we do not own are preserved."""
    return hf_config_object(cfg, base).to_diff_dict()


# ---------------------------------------------------------------- locating files


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors,
    configs and tokenizer files only) into the local Hugging Face cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a model directory (config.json + safetensors), got a file")
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such directory (and not a Hugging Face hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as e:  # network, auth, missing repo: say which and what to do
        raise CheckpointError(
            f"{name}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}). Pass a local model directory, or check the id and your network."
        ) from None
    return Path(local)


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are not in {d}: {missing}")
        return [d / f for f in files]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{d}: has only pickle weights ({', '.join(pickles[:3])}); pickle files can run arbitrary code "
            "and are refused. Convert them to safetensors first, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)."
        )
    raise CheckpointError(f"{d}: no model.safetensors, no safetensors index and no *.safetensors files")


# ---------------------------------------------------------------- import


def hf_names(cfg: ModelConfig) -> dict[tuple[str, ...], list[str] | str]:
    """Our param path -> HF tensor name (top level) or list of per-layer names."""
    names: dict[tuple[str, ...], Any] = {}
    shapes = param_shapes(cfg)
    for top, leaves in shapes.items():
        if top == "layers":
            continue
        for leaf in leaves:
            names[(top, leaf)] = f"{_TOP_MODULES[top]}.{_HF_LEAF[leaf]}"
    for mod, leaves in shapes["layers"].items():
        for leaf in leaves:
            names[("layers", mod, leaf)] = [
                f"model.layers.{i}.{_LAYER_MODULES[mod]}.{_HF_LEAF[leaf]}" for i in range(cfg.num_layers)
            ]
    return names


def _to_ours(path: tuple[str, ...], t: np.ndarray) -> np.ndarray:
    return t.T if path[-1] == "kernel" else t


def _damaged(f: Path, e: Exception, tensor: str | None = None) -> CheckpointError:
    what = f"tensor {tensor!r} cannot be read" if tensor else "not a readable safetensors file"
    return CheckpointError(
        f"{f}: {what} ({type(e).__name__}: {e}); the file is truncated or damaged: re-download or re-export it"
    )


def load_hf_on_host(path_or_id: str | os.PathLike, **overrides) -> HFModel:
    """Imports a Hugging Face causal LM checkpoint, the whole model on the
    host (np.stack of every layer) then on the default device. Kept as the
    reference of load_hf (tests, bench/load.py).

    overrides: ModelConfig fields, e.g. param_dtype="bfloat16",
    attention_impl="dense". Every expected tensor must be present with the
    expected shape; tensors we do not know are an error (so a silently
    ignored weight can never happen).
    """
    d = resolve_model_dir(path_or_id)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{d}: no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, str(cfg_path), **overrides)
    files = _weight_files(d)
    handles = {}
    where: dict[str, Path] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="numpy")
            keys = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise _damaged(f, e) from None
        handles[f] = h
        for k in keys:
            where[k] = f
    names = hf_names(cfg)
    shapes = param_shapes(cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    used: set[str] = set()

    def fetch(path, name, shape):
        if name not in where:
            if path == ("lm_head", "kernel"):
                raise CheckpointError(
                    f"{d}: tensor {name!r} is missing and tie_word_embeddings is false in config.json"
                )
            raise CheckpointError(f"{d}: tensor {name!r} is missing from {[f.name for f in files]}")
        used.add(name)
        try:
            t = _to_ours(path, handles[where[name]].get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise _damaged(where[name], e, name) from None
        if t.shape != shape:
            raise CheckpointError(
                f"{where[name]}: tensor {name!r} has shape {t.T.shape if path[-1] == 'kernel' else t.shape}, "
                f"config.json implies {shape[::-1] if path[-1] == 'kernel' else shape}"
            )
        return t

    params: Params = {}
    for path, name in names.items():
        shape = shapes
        for p in path:
            shape = shape[p]
        if isinstance(name, list):
            per_layer = shape[1:]
            stacked = np.stack([fetch(path, n, per_layer) for n in name])
            value = jnp.asarray(stacked, dtype=dtype)
        else:
            value = jnp.asarray(fetch(path, name, shape), dtype=dtype)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    extra = sorted(k for k in where if k not in used and not _IGNORED.match(k))
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{d}: unexpected tensors for a {FAMILY_ARCH[cfg.family]} with this config: {extra[:5]}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    return HFModel(cfg=cfg, params=params, hf_config=hf, source_dir=d)


def load_hf(path_or_id: str | os.PathLike, shardings: Any = None, mesh: Any = None, **overrides) -> HFModel:
    """Imports a Hugging Face causal LM checkpoint straight into its target shardings.

    shardings: a params pytree of jax.sharding.Sharding; or mesh: a
    (data, fsdp, tensor) Mesh, whose shardings come from LOGICAL_RULES
    (sharding.param_shardings); neither: the default device. Each leaf is
    assembled with jax.make_array_from_callback: for each addressable
    device's index, only that slice of each needed tensor (and, for a leaf
    stacked on [L], only the layers of the index) is read from the
    safetensors files (get_slice), transposed for kernels and cast to
    cfg.param_dtype into one buffer of the device's shard. No full stacked
    copy on the host: peak host memory ~ the shards plus one layer slice.
    overrides: ModelConfig fields. Same checks as before: every expected
    tensor present with the expected shape (read from the headers before
    any data), no unknown tensors.
    """
    d = resolve_model_dir(path_or_id)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{d}: no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, str(cfg_path), **overrides)
    files = _weight_files(d)
    handles, where = {}, {}
    for f in files:
        try:
            h = safe_open(str(f), framework="numpy")
            keys = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise _damaged(f, e) from None
        handles[f] = h
        for k in keys:
            where[k] = f
    names = hf_names(cfg)
    shapes = param_shapes(cfg)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    if shardings is None and mesh is not None:
        from focusft_jax.model import logical_axes
        from focusft_jax.sharding import param_shardings

        shardings = param_shardings(
            jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)),
            logical_axes(cfg), mesh)
    used: set[str] = set()

    def check(path, name, shape):  # from the header only: no data read
        if name not in where:
            if path == ("lm_head", "kernel"):
                raise CheckpointError(
                    f"{d}: tensor {name!r} is missing and tie_word_embeddings is false in config.json"
                )
            raise CheckpointError(f"{d}: tensor {name!r} is missing from {[f.name for f in files]}")
        used.add(name)
        try:
            got = tuple(handles[where[name]].get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise _damaged(where[name], e, name) from None
        kernel = path[-1] == "kernel"
        if (got[::-1] if kernel else got) != tuple(shape):
            raise CheckpointError(
                f"{where[name]}: tensor {name!r} has shape {got}, "
                f"config.json implies {tuple(shape[::-1]) if kernel else tuple(shape)}"
            )

    def read(path, name, idx):
        """Our-layout slice idx (a tuple of slices) of tensor `name`, in `dtype`."""
        kernel = path[-1] == "kernel"
        try:
            t = handles[where[name]].get_slice(name)[tuple(idx[::-1]) if kernel else tuple(idx)]
        except (SafetensorError, OSError) as e:
            raise _damaged(where[name], e, name) from None
        return (t.T if kernel else t).astype(dtype, copy=False)

    def build(path, name, shape, sharding):
        stacked = isinstance(name, list)
        for n in name if stacked else [name]:
            check(path, n, shape[1:] if stacked else shape)
        cache: dict = {}  # replicated dims: devices sharing an index share one host read

        def cb(index):
            idx = tuple(slice(*s.indices(dim)) for s, dim in zip(index, shape))
            key = tuple((s.start, s.stop, s.step) for s in idx)
            if key not in cache:
                if stacked:
                    layers = range(*idx[0].indices(shape[0]))
                    out = np.empty((len(layers),) + tuple(len(range(*s.indices(dm))) for s, dm in
                                                          zip(idx[1:], shape[1:])), dtype)
                    for j, i in enumerate(layers):
                        out[j] = read(path, name[i], idx[1:])
                    cache[key] = out
                else:
                    cache[key] = np.ascontiguousarray(read(path, name, idx))
            return cache[key]

        return jax.make_array_from_callback(tuple(shape), sharding, cb)

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: Params = {}
    for path, name in names.items():
        shape, sh = shapes, shardings
        for p in path:
            shape = shape[p]
            sh = sh[p] if sh is not None else None
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = build(path, name, shape, sh if sh is not None else default)
    extra = sorted(k for k in where if k not in used and not _IGNORED.match(k))
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{d}: unexpected tensors for a {FAMILY_ARCH[cfg.family]} with this config: {extra[:5]}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    return HFModel(cfg=cfg, params=params, hf_config=hf, source_dir=d)


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class _ExportTensor:
    """One tensor of the export: its HF name, where it is in our parameters
    (`path`, and the layer of a stacked leaf), its HF shape and dtype."""

    name: str
    path: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _export_plan(cfg: ModelConfig, params: Params) -> list[_ExportTensor]:
    """The export's tensors in file order, from the parameters' shapes only."""
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    plan = []
    for path, name in hf_names(cfg).items():
        leaf = params
        for p in path:
            leaf = leaf[p]
        shape = tuple(leaf.shape[1:] if isinstance(name, list) else leaf.shape)
        if path[-1] == "kernel":
            shape = shape[::-1]
        for layer, n in enumerate(name) if isinstance(name, list) else [(None, name)]:
            plan.append(_ExportTensor(n, path, layer, shape, dtype))
    return plan


_take_layer = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))


def _host_tensor(params: Params, t: _ExportTensor) -> np.ndarray:
    """Tensor `t` on this host, in its HF layout and dtype. A parameter that
    spans several processes is gathered, one tensor at a time: every process
    must call this for the same tensors in the same order (a collective)."""
    x = params
    for p in t.path:
        x = x[p]
    if t.layer is not None:
        x = _take_layer(x, t.layer) if isinstance(x, jax.Array) else x[t.layer]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x)
    if t.path[-1] == "kernel":
        x = x.T
    return np.ascontiguousarray(x, dtype=t.dtype)


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}


def write_shard(path: Path, tensors: list[_ExportTensor], arrays: Iterator[np.ndarray]) -> None:
    """A safetensors file holding `tensors`, in order, whose data are `arrays`
    (one per tensor, as they come): the header is written first (the sizes
    are known from the shapes), then each array, so that one tensor at a time
    is in memory. The layout is the format's: an 8-byte little-endian header
    length, the JSON header padded with spaces to 8 bytes, the data."""
    header: dict[str, Any] = {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t, a in zip(tensors, arrays, strict=True):
            if a.shape != t.shape or a.dtype != t.dtype:  # pragma: no cover - _host_tensor makes them so
                raise CheckpointError(f"{t.name}: expected {t.shape} {t.dtype}, got {a.shape} {a.dtype}")
            f.write(a.view(np.uint8).data)  # bytes as they are (bfloat16 has no buffer format)


def _export_siblings(out: Path) -> tuple[Path, Path]:
    """(backup, tmp prefix) of export directory `out`: hidden siblings in the
    same parent, so each rename stays on one filesystem."""
    return out.parent / f".{out.name}.old", out.parent / f".{out.name}.tmp-"


def _is_complete_export(d: Path) -> bool:
    """config.json and every weight file its index (or the directory) names."""
    if not (d / "config.json").is_file():
        return False
    try:
        _weight_files(d)
    except CheckpointError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_export(out_dir: str | os.PathLike) -> None:
    """Repairs what an export killed part way (see save_hf) left next to
    `out_dir`: a backup of the previous export is put back when `out_dir` is
    missing and the backup is complete, and removed otherwise (the swap had
    finished, or it is not a loadable export); temporary directories of dead
    exporting processes are removed. Idempotent; a no-op after a clean export."""
    out = Path(out_dir)
    backup, tmp_prefix = _export_siblings(out)
    if backup.is_dir():
        if not out.exists() and _is_complete_export(backup):
            os.replace(backup, out)  # killed between the two renames: the previous good export
        else:
            shutil.rmtree(backup)
    if out.parent.is_dir():
        for tmp in out.parent.glob(f"{tmp_prefix.name}*"):
            pid = tmp.name[len(tmp_prefix.name):]
            if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
                shutil.rmtree(tmp, ignore_errors=True)


def _export_owns(name: str) -> bool:
    """A file name save_hf writes (or a stale one of an earlier export: other shard counts)."""
    return fnmatch.fnmatch(name, "model*.safetensors") or name in (
        "model.safetensors.index.json", "config.json", "generation_config.json", TRAINING_RECORD, *TOKENIZER_FILES
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    generation_config: dict[str, Any] | None = None,
    training_record: dict[str, Any] | None = None,
) -> Path:
    """Writes a Hugging Face model directory loadable by
    `AutoModelForCausalLM.from_pretrained`.

    training_record: written as focusft.json beside config.json
    (focusft_jax.training_record); without it an earlier export's record goes.

    params: the base model only (fast weights are never part of it).
    hf_config: the imported config.json, whose extra keys (token ids, ...)
    are kept. tokenizer_dir: the directory whose tokenizer files and chat
    template are copied along. Tensors are written in cfg.param_dtype.

    Streaming: tensors are gathered and written one at a time (never the
    whole model in host memory). In a multi-process run every process calls
    save_hf with the same arguments: each parameter that spans several
    processes is gathered by all of them in turn, and process 0 writes.

    Atomic: the whole directory is written and fsynced in a hidden sibling
    `.NAME.tmp-PID`, then swapped in (old directory renamed to `.NAME.old`,
    new one renamed into place, backup deleted), so a kill at any point leaves
    either the previous or the new complete export (recover_export, run first
    here, puts a killed swap right). In an existing `out_dir` (empty, an
    export or a tokenizer directory), the files an export writes are all
    replaced (stale shards and tokenizer files go) and other entries are
    copied into the new directory.
    """
    if jax.process_index() != 0:  # the other processes only take their part in gathering each tensor
        for t in _export_plan(cfg, params):
            _host_tensor(params, t)
        return Path(out_dir)
    out = Path(out_dir)
    if out.is_symlink():  # swap the directory it points to, not the link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; cannot export a model there")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_export(out)
    present = [p.name for p in out.iterdir()] if out.is_dir() else []
    if present and not any(_export_owns(name) for name in present):
        raise CheckpointError(
            f"{out}: is a non-empty directory that is neither a model export nor a tokenizer directory; "
            "the export swaps its directory as a whole, so pass an empty or new directory"
        )
    backup, tmp_prefix = _export_siblings(out)
    tmp = Path(f"{tmp_prefix}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_hf_dir(tmp, cfg, params, hf_config, tokenizer_dir, max_shard_bytes, generation_config)
        if training_record is not None:
            write_training_record(tmp, training_record)
        for name in present:  # what others put in the directory stays; stale export files do not
            if not _export_owns(name) and not (tmp / name).exists():
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.copytree(out / name, tmp / name, symlinks=True)
                else:
                    shutil.copy2(out / name, tmp / name, follow_symlinks=False)
        for root, dirs, files in os.walk(tmp):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(Path(root, name))
            _fsync(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup.exists() and not out.exists():
            os.replace(backup, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)
    shutil.rmtree(backup, ignore_errors=True)
    return out


def _shards(plan: list[_ExportTensor], max_shard_bytes: int) -> list[list[_ExportTensor]]:
    """`plan` cut, in order, into files of at most max_shard_bytes, the way
    huggingface_hub's split_torch_state_dict_into_shards cuts (what
    save_pretrained uses): a tensor bigger than the limit gets a file of its
    own, and the file being filled stays open for the tensors after it."""
    shards: list[list[_ExportTensor]] = []
    current: list[_ExportTensor] = []
    size = 0
    for t in plan:
        if t.nbytes > max_shard_bytes:
            shards.append([t])
            continue
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _shard_names(n: int) -> list[str]:
    """save_pretrained's file names: model.safetensors for one file, else
    model-0000i-of-0000n.safetensors with an index."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _generation_config(config, source: dict[str, Any] | None):
    """The transformers GenerationConfig the export saves: the source's
    values when it had one (as from_pretrained loads it), else the one
    transformers derives from the model config (bos/eos/pad ids,
    `_from_model_config`), as a freshly built model has."""
    from transformers import GenerationConfig

    if source is not None:
        return GenerationConfig.from_dict(source)
    return GenerationConfig.from_model_config(config)


def _write_hf_dir(
    out: Path,
    cfg: ModelConfig,
    params: Params,
    hf_config: dict[str, Any] | None,
    tokenizer_dir: str | os.PathLike | None,
    max_shard_bytes: int,
    generation_config: dict[str, Any] | None,
) -> None:
    """save_hf's files, into the (empty, temporary) directory `out`, named and
    serialized as the installed transformers' `save_pretrained` writes them.
    A tokenizer_dir that is the export being replaced is still there to read."""
    config = hf_config_object(cfg, hf_config)
    shards = _shards(_export_plan(cfg, params), max_shard_bytes)
    names = _shard_names(len(shards))
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        write_shard(out / fname, shard, (_host_tensor(params, t) for t in shard))
        weight_map.update({t.name: fname for t in shard})
    if len(shards) > 1:
        tensors = [t for shard in shards for t in shard]
        index = {
            "metadata": {"total_parameters": sum(t.nbytes // t.dtype.itemsize for t in tensors),
                         "total_size": sum(t.nbytes for t in tensors)},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.to_json_file(out / "config.json", use_diff=True)  # what config.save_pretrained writes

    src = Path(tokenizer_dir) if tokenizer_dir is not None else None
    gen_src = src / "generation_config.json" if src is not None else None
    if generation_config is None and gen_src is not None and gen_src.exists():
        try:
            generation_config = json.loads(gen_src.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{gen_src}: not valid JSON ({e})") from None
    gen = _generation_config(config, generation_config)
    gen.to_json_file(out / "generation_config.json", use_diff=True)  # as GenerationConfig.save_pretrained
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
        _set_model_max_length(out / "tokenizer_config.json", cfg.max_position_embeddings)


def _set_model_max_length(path: Path, length: int) -> None:
    """The exported tokenizer's model_max_length is the model's context
    (max_position_embeddings), whatever the source tokenizer said."""
    if not path.exists():
        return
    try:
        tok_cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(tok_cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(tok_cfg).__name__}")
    if tok_cfg.get("model_max_length") != length:
        tok_cfg["model_max_length"] = length
        path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def export_model(model: HFModel, out_dir: str | os.PathLike, params: Params | None = None, **kw) -> Path:
    """save_hf for an imported model: its config keys and tokenizer travel along."""
    return save_hf(
        out_dir,
        model.cfg,
        model.params if params is None else params,
        hf_config=model.hf_config,
        tokenizer_dir=model.source_dir,
        **kw,
    )

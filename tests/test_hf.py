"""Import/export round trips against `transformers` (PyTorch CPU), and the
checkpoint errors a user can hit."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from focusft_jax import hf
from focusft_jax.attention import attention_meta
from focusft_jax.model import forward, positions_from_mask
from tests.tiny_models import FAMILY_CASES

TOL = 1e-4


def _tokens(vocab: int, batch: int = 2, seq: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def _ours(model: hf.HFModel, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    t = jnp.asarray(ids)
    m = jnp.ones_like(t) if mask is None else jnp.asarray(mask)
    meta = attention_meta(m, kind="causal")
    return np.asarray(forward(model.cfg, model.params, t, positions_from_mask(m), meta))


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.as_tensor(mask)
        kw["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kw).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_import_export_round_trip_matches_transformers(case, tiny_model_dir, tmp_path):
    src = tiny_model_dir(case)
    ref_model = AutoModelForCausalLM.from_pretrained(src).eval()
    model = hf.load_hf(src)
    ids = _tokens(model.cfg.vocab_size)
    ref = _torch_logits(ref_model, ids)
    ours = _ours(model, ids)
    assert np.abs(ours - ref).max() < TOL, case

    out = hf.export_model(model, tmp_path / "export")
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert np.abs(_torch_logits(reloaded.eval(), ids) - ours).max() < TOL, case
    # And our own import of the export is exact.
    again = hf.load_hf(out)
    assert again.cfg == model.cfg
    assert np.array_equal(_ours(again, ids), ours)


def test_padded_batch_matches_transformers(tiny_model_dir):
    """Left padding with positions starting at each row's first real token."""
    src = tiny_model_dir("qwen2_tied")
    ref_model = AutoModelForCausalLM.from_pretrained(src).eval()
    model = hf.load_hf(src)
    ids = _tokens(model.cfg.vocab_size, batch=3, seq=20)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :15] = 0
    ref = _torch_logits(ref_model, ids, mask)
    ours = _ours(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < TOL


def test_tied_model_has_no_lm_head_and_export_keeps_it_tied(tiny_model_dir, tmp_path):
    model = hf.load_hf(tiny_model_dir("qwen2_tied"))
    assert "lm_head" not in model.params
    out = hf.export_model(model, tmp_path / "e")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_sharded_export_and_sharded_import(tiny_model_dir, tmp_path):
    model = hf.load_hf(tiny_model_dir("llama"))
    out = hf.export_model(model, tmp_path / "e", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert all((out / s).exists() for s in shards)
    sizes = sum(t.nbytes for s in shards for t in load_file(str(out / s)).values())
    assert index["metadata"]["total_size"] == sizes
    again = hf.load_hf(out)
    ids = _tokens(model.cfg.vocab_size)
    assert np.array_equal(_ours(again, ids), _ours(model, ids))


def test_export_copies_tokenizer_and_generation_config(tiny_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir("llama"), src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    model = hf.load_hf(src)
    out = hf.export_model(model, tmp_path / "e")
    # Copied, with the tokenizer's context set to the model's (256).
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"chat_template": "x", "model_max_length": 256}
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_bfloat16_import_and_export(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3")
    model = hf.load_hf(src, param_dtype="bfloat16", compute_dtype="bfloat16")
    assert model.params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    ids = _tokens(model.cfg.vocab_size)
    f32 = _ours(hf.load_hf(src), ids)
    bf16 = _ours(model, ids)
    assert np.isfinite(bf16).all()
    # bf16 compute follows float32 closely on a tiny model (relative to logit scale).
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()
    out = hf.export_model(model, tmp_path / "e")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(hf.CheckpointError, match="GPT2LMHeadModel.*not supported"):
        hf.load_hf(d)


def test_unsupported_rope_type_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(hf.CheckpointError, match="rope type 'dynamic' is not supported"):
        hf.load_hf(d)


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(hf.CheckpointError, match="pickle"):
        hf.load_hf(d)


def test_missing_and_unexpected_tensors_are_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    removed = dict(tensors)
    del removed["model.layers.1.mlp.up_proj.weight"]
    save_file(removed, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load_hf(d)
    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    save_file(extra, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="unexpected tensors.*mlp.extra"):
        hf.load_hf(d)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    _edit_config(d, intermediate_size=80)
    with pytest.raises(hf.CheckpointError, match="gate_proj.weight.*shape"):
        hf.load_hf(d)


def test_missing_directory_and_bad_index(tmp_path, tiny_model_dir):
    with pytest.raises(hf.CheckpointError, match="no such directory"):
        hf.load_hf(tmp_path / "nope" / "deeper")
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match="gone.safetensors"):
        hf.load_hf(d)


def test_config_rope_layouts_v4_and_v5_agree():
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    v4 = hf.config_from_hf(
        dict(base, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}), "v4"
    )
    v5 = hf.config_from_hf(dict(base, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}), "v5")
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.rope_type == "linear" and v4.rope_params == {"factor": 2.0}

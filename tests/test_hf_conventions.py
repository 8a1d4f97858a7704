"""The export is laid out as the installed transformers' `save_pretrained`
writes a model: the same file names, config.json and generation_config.json
keys, the sharded index layout; and older layouts still load."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from focusft_jax import hf
from focusft_jax.tokenizer import build_chat_tokenizer

TEXTS = [f"user asks question {k} and the assistant answers {k * 7}" for k in range(40)]

CASES = {
    "llama": ("LlamaConfig", {}),
    # a qwen2 with Qwen2.5's shape of config: qkv bias, tied embeddings
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=64))),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return build_chat_tokenizer(TEXTS, d, vocab_size=300), d


def _model(case: str, vocab: int):
    cls, kw = CASES[case]
    config = getattr(transformers, cls)(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=1, pad_token_id=0, **kw,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_save_pretrained(case, tokenizer, tmp_path):
    tok, tok_dir = tokenizer
    model = _model(case, len(tok))
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    tok.save_pretrained(ref)
    loaded = hf.load_hf(ref)  # the same weights and config, as our trainer holds them
    ours = hf.save_hf(tmp_path / "ours", loaded.cfg, loaded.params, loaded.hf_config, tokenizer_dir=tok_dir)

    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (ours / "model.safetensors").exists() and not (ours / "model.safetensors.index.json").exists()
    ref_cfg, our_cfg = _json(ref / "config.json"), _json(ours / "config.json")
    assert sorted(our_cfg) == sorted(ref_cfg)
    assert our_cfg == ref_cfg  # every value too: architecture, rope_parameters, dtype, transformers_version
    assert our_cfg["transformers_version"] == transformers.__version__ and "torch_dtype" not in our_cfg
    assert our_cfg["rope_parameters"]["rope_theta"] == loaded.cfg.rope_theta
    ref_gen, our_gen = _json(ref / "generation_config.json"), _json(ours / "generation_config.json")
    assert sorted(our_gen) == sorted(ref_gen) and our_gen == ref_gen
    assert our_gen["_from_model_config"] is True and our_gen["eos_token_id"] == 1
    # The tokenizer says the model's context, not the 32768 it was built with.
    assert _json(ref / "tokenizer_config.json")["model_max_length"] == 32768
    our_tok = _json(ours / "tokenizer_config.json")
    assert our_tok["model_max_length"] == 256
    # (its other keys are the source tokenizer's, copied: build_chat_tokenizer
    # writes a tokenizer_config.json that transformers v4 reads too)
    assert {k: v for k, v in our_tok.items() if k != "model_max_length"} == {
        k: v for k, v in _json(tok_dir / "tokenizer_config.json").items() if k != "model_max_length"}
    # transformers loads the export: same logits as the model it came from.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, len(tok), (1, 12)))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(ours).model_max_length == 256


def test_sharded_export_has_save_pretrained_index_layout(tokenizer, tmp_path):
    tok, _ = tokenizer
    model = _model("llama", len(tok))
    ref = tmp_path / "ref"
    model.save_pretrained(ref, max_shard_size=20_000)
    loaded = hf.load_hf(ref)
    ours = hf.save_hf(tmp_path / "ours", loaded.cfg, loaded.params, loaded.hf_config, max_shard_bytes=20_000)
    ref_index, our_index = _json(ref / "model.safetensors.index.json"), _json(ours / "model.safetensors.index.json")
    assert our_index.keys() == ref_index.keys() == {"metadata", "weight_map"}
    assert our_index["metadata"] == ref_index["metadata"]  # total_size and total_parameters
    assert sorted(our_index["weight_map"]) == sorted(ref_index["weight_map"])
    shards = sorted(set(our_index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in ours.glob("*.safetensors")) == shards
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in ref_index["weight_map"].values())
    assert not (ours / "model.safetensors").exists()
    assert sorted(_json(ours / "config.json")) == sorted(_json(ref / "config.json"))
    again = hf.load_hf(ours)
    assert again.cfg == loaded.cfg
    for name in ("embed_tokens", "lm_head"):
        assert np.array_equal(np.asarray(again.params[name]["kernel" if name == "lm_head" else "embedding"]),
                              np.asarray(loaded.params[name]["kernel" if name == "lm_head" else "embedding"]))


def test_older_export_layout_still_loads(tokenizer, tmp_path):
    """A v4-era export: torch_dtype, rope_theta / rope_scaling at the top
    level, one shard named model-00001-of-00001 with an index."""
    tok, _ = tokenizer
    model = _model("llama3_rope", len(tok))
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    new = hf.load_hf(ref)
    old = tmp_path / "old"
    old.mkdir()
    cfg = _json(ref / "config.json")
    rope = cfg.pop("rope_parameters")
    theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type")
    cfg.update(torch_dtype=cfg.pop("dtype"), rope_theta=theta, transformers_version="4.51.0",
               rope_scaling={"type": rope_type, **rope})
    (old / "config.json").write_text(json.dumps(cfg))
    (ref / "model.safetensors").rename(old / "model-00001-of-00001.safetensors")
    with safe_open(str(old / "model-00001-of-00001.safetensors"), framework="numpy") as f:
        weight_map = {k: "model-00001-of-00001.safetensors" for k in f.keys()}
    (old / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = hf.load_hf(old)
    assert loaded.cfg == new.cfg and loaded.cfg.rope_theta == 5e5 and loaded.cfg.rope_type == "llama3"
    assert np.array_equal(np.asarray(loaded.params["layers"]["q_proj"]["kernel"]),
                          np.asarray(new.params["layers"]["q_proj"]["kernel"]))
    # Its re-export is in today's layout.
    out = hf.export_model(loaded, tmp_path / "re")
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    re_cfg = _json(out / "config.json")
    assert "torch_dtype" not in re_cfg and "rope_theta" not in re_cfg and "rope_scaling" not in re_cfg
    assert re_cfg["rope_parameters"] == _json(ref / "config.json")["rope_parameters"]
    assert re_cfg["dtype"] == "float32" and re_cfg["transformers_version"] == transformers.__version__

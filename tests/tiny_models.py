"""Tiny random Hugging Face models, one per supported family and feature.

Each case exercises something the import must get right: GQA, qkv bias, tied
and untied embeddings, q/k norm, an explicit head_dim, and every rope type.
Weights are drawn with a large initializer range so that logits are far from
ties and parity errors are visible.
"""
from __future__ import annotations

from pathlib import Path

_COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILY_CASES: dict[str, tuple[str, dict]] = {
    # GQA, untied, no bias, default rope
    "llama": ("LlamaConfig", dict(_COMMON)),
    # Llama-3 rope scaling: original context 64 puts some frequencies in each band
    "llama3_rope": (
        "LlamaConfig",
        dict(
            _COMMON,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama_linear_rope": ("LlamaConfig", dict(_COMMON, rope_scaling=dict(rope_type="linear", factor=2.0))),
    # Qwen2.5 small sizes: qkv bias, tied embeddings
    "qwen2_tied": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True)),
    # Qwen2.5 long-context: yarn scaling, untied
    "qwen2_yarn": (
        "Qwen2Config",
        dict(
            _COMMON,
            tie_word_embeddings=False,
            max_position_embeddings=64,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
        ),
    ),
    # Qwen3: q/k RMSNorm, head_dim not hidden/heads, MQA
    "qwen3": ("Qwen3Config", dict(_COMMON, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=None)),
}

# One case per family, for the slower tests (generation).
FAMILY_REPRESENTATIVES = ("llama3_rope", "qwen2_tied", "qwen3", "mistral")


def write_tiny_hf_model(case: str, out_dir: Path, seed: int = 0) -> Path:
    """Saves a tiny random `transformers` model of `case` (float32,
    safetensors) to out_dir and returns it."""
    import torch
    import transformers

    cls_name, kw = FAMILY_CASES[case]
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)

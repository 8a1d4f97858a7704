"""Config loading, overrides and the errors a user can make."""
from __future__ import annotations

from pathlib import Path

import pytest

from focusft_jax.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = """
model:
  path: some/model
data:
  train: [data.jsonl]
"""


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["optim.lr=2e-5", "method.targets=[up_proj]", "train.max_steps=7"])
    assert cfg.optim.lr == 2e-5
    assert cfg.method.targets == ("up_proj",)
    assert cfg.train.max_steps == 7
    assert cfg.method.num_inner_steps == 2 and cfg.method.fraction == 0.35  # METHOD.md defaults
    assert cfg.method.rank == 32 and cfg.method.alpha == 64.0 and cfg.method.inner_lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown key optim\.lrr; allowed keys in optim: \['lr'"),
        ("nonsense.x=1", "unknown key nonsense"),
        ("optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
        ("train.batch_size=2.5", r"train\.batch_size: expected an integer"),
        ("method.attention=sliding", r"method\.attention: expected one of \['glm_bidir', 'causal'\]"),
        ("method.meta_gradient=second", r"method\.meta_gradient: expected one of"),
        ("data.truncation=middle", r"data\.truncation: expected one of \['left', 'right', 'error'\]"),
        ("checkpoint.async_save=maybe", r"checkpoint\.async_save: expected true or false"),
        ("method.targets=[ffn]", r"method\.targets: 'ffn' is not one of"),
        ("method.fraction=1.5", r"method\.fraction: must be in \[0, 1\]"),
        ("train.micro_batch_size=3", r"train\.batch_size \(8\) must be a positive multiple of train\.micro_batch_size"),
        ("data.bucket_size=300", r"data\.bucket_size: must divide data\.max_length"),
        ("model.init={hidden_size: 8}", "set exactly one of model.path"),
        ("optim", "expected KEY=VALUE"),
    ],
)
def test_bad_configs_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL), [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="data: set data.train"):
        load_config(_write(tmp_path, "model:\n  path: x\n"))


def test_shipped_configs_load():
    for name in ("tiny.yaml", "focusft_qwen25_7b.yaml", "sft_qwen25_7b.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.train.output_dir
    paper = load_config(CONFIGS / "focusft_qwen25_7b.yaml")
    assert paper.model.path == "Qwen/Qwen2.5-7B"
    assert (paper.method.num_inner_steps, paper.method.rank, paper.method.alpha) == (2, 32, 64.0)
    assert paper.optim.lr == 1e-5 and paper.train.batch_size == 32 and paper.data.max_length == 4096
    sft = load_config(CONFIGS / "sft_qwen25_7b.yaml")
    assert sft.method.num_inner_steps == 0 and sft.method.attention == "causal"

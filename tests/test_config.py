"""Config loading, overrides and the errors a user can make."""
from __future__ import annotations

from pathlib import Path

import pytest

from focusft_jax.config import ConfigError, dump_config, load_config
from focusft_jax.model import ModelConfig

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
        ("model.init.family=gpt2", r"model\.init\.family: expected one of \['llama', 'qwen2'"),
        ("model.init.num_layers=0", r"model\.init\.num_layers: must be >= 1, got 0"),
        ("model.init.num_kv_heads=3", r"model\.init\.num_kv_heads: num_heads \(4\) must be a multiple"),
        ("model.init.hidden_size=big", r"model\.init\.hidden_size: expected an integer"),
        ("model.init.hidden_size=30", r"model\.init\.head_dim: hidden_size \(30\) is not a multiple of num_heads"),
        ("model.init.init_std=0.1", r"model\.init\.init_std is not a key of model\.init; set model\.init_std"),
        ("model.init.param_dtype=bfloat16", r"model\.init\.param_dtype is not a key of model\.init; set model\.param_dtype"),
        ("model.init.remat=full", r"model\.init\.remat is not a key of model\.init; set model\.remat"),
        ("model.init.scan_layers=false", r"unknown key model\.init\.scan_layers; allowed keys in model\.init"),
        ("model.init.rope_scaling=[]", r"unknown key model\.init\.rope_scaling"),
        ("optim", "expected KEY=VALUE"),
        # Accepted before and silently wrong (issue 11, item 6):
        ("optim.weight_decay=-0.1", r"optim\.weight_decay: must be >= 0, got -0\.1"),
        ("optim.b1=1.0", r"optim\.b1: must be in \[0, 1\), got 1\.0"),
        ("optim.b2=-0.5", r"optim\.b2: must be in \[0, 1\)"),
        ("optim.eps=0", r"optim\.eps: must be > 0, got 0"),
        ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio: must be in \[0, 1\]"),
        ("optim.min_lr_ratio=-0.1", r"optim\.min_lr_ratio: must be in \[0, 1\]"),
        ("optim.warmup_ratio=-0.1", r"optim\.warmup_ratio: must be in \[0, 1\)"),
        ("optim.grad_clip=-1", r"optim\.grad_clip: must be >= 0 \(0 turns clipping off\)"),
        ("optim.lr=0", r"optim\.lr: must be > 0"),
        ("optim.lr=.nan", r"optim\.lr: must be > 0, got nan"),
        ("optim.lr=nan", r"optim\.lr: expected a number, got 'nan'"),
        ("method.alpha=0", r"method\.alpha: must be > 0"),
        ("method.inner_lr=-1", r"method\.inner_lr: must be >= 0, got -1"),
    ],
)
def test_bad_configs_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL), [override])


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads 2e-3 (no dot) as a string; in a float field it is the number, as with --set."""
    cfg = load_config(_write(tmp_path, MINIMAL + "optim:\n  lr: 2e-3\n  eps: 1E-6\nmethod:\n  inner_lr: 5e-1\n"))
    assert cfg.optim.lr == 2e-3 and cfg.optim.eps == 1e-6 and cfg.method.inner_lr == 0.5
    assert isinstance(cfg.optim.lr, float)
    assert load_config(_write(tmp_path, MINIMAL), ["optim.lr=2e-3"]).optim.lr == 2e-3
    assert load_config(_write(tmp_path, MINIMAL), ["optim.grad_clip=0"]).optim.grad_clip == 0.0  # off


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="data: set data.train"):
        load_config(_write(tmp_path, "model:\n  path: x\n"))


def test_shipped_configs_load():
    for name in ("tiny.yaml", "tiny_niah.yaml", "focusft_qwen25_7b.yaml", "sft_qwen25_7b.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.train.output_dir
    paper = load_config(CONFIGS / "focusft_qwen25_7b.yaml")
    assert paper.model.path == "Qwen/Qwen2.5-7B"
    assert (paper.method.num_inner_steps, paper.method.rank, paper.method.alpha) == (2, 32, 64.0)
    assert paper.optim.lr == 1e-5 and paper.train.batch_size == 32 and paper.data.max_length == 4096
    sft = load_config(CONFIGS / "sft_qwen25_7b.yaml")
    assert sft.method.num_inner_steps == 0 and sft.method.attention == "causal"


FROM_SCRATCH = """
model:
  init: {family: qwen3, hidden_size: 64, num_heads: 4, num_kv_heads: 2}
  tokenizer: some/tokenizer
  param_dtype: bfloat16
  init_std: 0.05
data:
  train: [data.jsonl]
"""


def test_model_init_is_the_model_config(tmp_path):
    cfg = load_config(_write(tmp_path, FROM_SCRATCH), ["model.init.sliding_window=16"])
    init = cfg.model.init
    assert isinstance(init, ModelConfig)
    assert init.head_dim == 16  # hidden_size // num_heads
    assert init.qk_norm is True and init.qkv_bias is False  # from the family
    assert init.vocab_size is None and init.tie_word_embeddings is False and init.num_layers == 4
    assert init.sliding_window == 16
    # the numerics and the init scale are keys of the model section, not of model.init
    assert init.param_dtype == "float32" and cfg.model.param_dtype == "bfloat16"
    assert cfg.model.init_std == 0.05
    assert init.replace(**cfg.model.numerics()).param_dtype == "bfloat16"
    assert set(cfg.model.numerics()) == {"param_dtype", "compute_dtype", "attention_impl", "remat"}


@pytest.mark.parametrize(
    "family, qkv_bias, qk_norm", [("qwen2", True, False), ("qwen3", False, True), ("llama", False, False)]
)
def test_family_defaults_and_explicit_values(family, qkv_bias, qk_norm):
    cfg = ModelConfig(family=family)
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.head_dim) == (qkv_bias, qk_norm, 32)
    explicit = ModelConfig(family=family, qkv_bias=not qkv_bias, qk_norm=not qk_norm, head_dim=8)
    assert (explicit.qkv_bias, explicit.qk_norm, explicit.head_dim) == (not qkv_bias, not qk_norm, 8)


def test_template_vocab_is_refused_by_the_model():
    from focusft_jax.model import param_shapes

    with pytest.raises(ValueError, match="vocab_size is None"):
        param_shapes(ModelConfig())


def test_saved_config_round_trips(tmp_path):
    for source in (_write(tmp_path, FROM_SCRATCH), CONFIGS / "tiny.yaml", CONFIGS / "focusft_qwen25_7b.yaml"):
        cfg = load_config(source)
        dump_config(cfg, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml") == cfg


# --- the command line and the config reference ------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- config-reference: begin", "<!-- config-reference: end -->"


def test_readme_config_table_is_the_generated_reference():
    import difflib

    from focusft_jax.config import config_reference_markdown

    text = README.read_text()
    begin = text.index("\n", text.index(BEGIN)) + 1
    in_readme = text[begin:text.index(END)]
    generated = config_reference_markdown()
    diff = "".join(difflib.unified_diff(in_readme.splitlines(True), generated.splitlines(True),
                                        "README.md", "python train.py --help-config markdown"))
    assert in_readme == generated, (
        "README.md's config table differs from the config dataclasses; paste the output of "
        "`python train.py --help-config markdown` between its config-reference markers:\n" + diff)


def test_every_config_key_has_a_meaning_and_is_listed():
    from focusft_jax.config import config_reference, is_config_key

    rows = config_reference()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) and all(is_config_key(k) for k in keys)
    # every leaf key, including the nested sections' keys
    assert {"model.path", "model.init.hidden_size", "data.builtin.tasks", "method.fused_first_order",
            "logging.progress"} <= set(keys)
    assert all(meaning for *_, meaning in rows)
    row = dict((k, (t, d)) for k, t, d, _ in rows)
    assert row["model.remat"] == ("one of `none`, `full`, `dots`", "`none`")
    assert row["train.max_steps"] == ("int or null", "–") and row["optim.lr"] == ("float", "1e-05")


def test_help_config_prints_the_reference(capsys):
    from focusft_jax.config import config_reference_text
    from focusft_jax.train import main

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert out == config_reference_text() and "optim.lr  (float; default 1e-05)\n    AdamW peak" in out


def test_bare_key_value_overrides_apply_in_order_with_set(monkeypatch):
    import focusft_jax.train as train_mod

    seen = {}
    monkeypatch.setattr(train_mod, "load_config", lambda path, sets: seen.update(path=path, sets=sets) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_mod.main(["optim.lr=1e-4", "--config", "tiny", "--set", "optim.lr=2e-5", "train.seed=3"])
    assert seen == {"path": "tiny", "sets": ["optim.lr=1e-4", "optim.lr=2e-5", "train.seed=3"]}
    # a value of --set / --config that contains '=' stays that option's value
    assert train_mod.overrides_as_options(["--config", "a=b.yaml", "x.y=1"]) == ["--config", "a=b.yaml", "--set", "x.y=1"]


def test_bare_argument_without_equals_is_an_error_naming_it(capsys):
    from focusft_jax.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny", "optim.lr"])
    assert e.value.code == 2 and "argument 'optim.lr': expected a config override KEY=VALUE" in capsys.readouterr().err


def test_config_by_shipped_name(tmp_path, monkeypatch):
    from focusft_jax.config import resolve_config_path

    monkeypatch.chdir(tmp_path)  # not found as a path: the shipped configs/tiny.yaml
    assert resolve_config_path("tiny") == resolve_config_path("tiny.yaml") == CONFIGS / "tiny.yaml"
    assert load_config("tiny").train == load_config(CONFIGS / "tiny.yaml").train
    with pytest.raises(ConfigError, match=r"config file nope does not exist \(nor is it a shipped config: .*tiny"):
        load_config("nope")

"""Bad input gives one `error:` line naming the file / row / key (issue 11,
item 5), raised before any compute: each test calls the loading or checking
function, or train.main with a config that fails before a model is built."""
from __future__ import annotations

import json
import sys
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from focusft_jax import job, run_dir
from focusft_jax.data import load_chat_dataset, parse_record, read_rows
from focusft_jax.errors import CheckpointError, ConfigError, DataError
from focusft_jax.hf import load_hf
from focusft_jax.sharding import make_mesh
from tests.data_fixtures import build_test_tokenizer, load_tokenizer

# No row of these tests reaches the tokenizer: the data pipeline only asks it to be fast.
NO_TOKENIZER = SimpleNamespace(is_fast=True)
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

TINY_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

TRAIN_YAML = """
model:
  init: {family: qwen2, vocab_size: 320, hidden_size: 32, intermediate_size: 64,
         num_layers: 1, num_heads: 4, num_kv_heads: 2, tie_word_embeddings: true}
data:
  builtin: {num_examples: 8, context_tokens: [0], seed: 0}
  max_length: 64
  bucket_size: 64
train: {batch_size: 2, micro_batch_size: 2, max_steps: 1}
logging: {progress: false, tensorboard: false}
"""


def _non_utf8_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    bad = json.dumps({"messages": [{"role": "user", "content": "caf@"}]}).encode().replace(b"@", b"\xff")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n" + json.dumps(GOOD).encode() + b"\n")
    return path


# --- data files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


def test_non_utf8_byte_names_file_and_line(tmp_path, chatml):
    path = _non_utf8_file(tmp_path)
    rows = list(read_rows(path))
    assert [r.where for r in rows] == [f"{path} line {k}" for k in (1, 2, 3)]  # line numbers stay the file's
    assert parse_record(rows[0]).messages == parse_record(rows[2]).messages == GOOD["messages"]
    with pytest.raises(DataError, match=r"train\.jsonl line 2: byte 0xff at column \d+ is not valid UTF-8") as e:
        parse_record(rows[1])
    assert e.value.reason == "invalid_utf8"
    with pytest.raises(DataError, match=r"train\.jsonl line 2: byte 0xff"):
        load_chat_dataset(path, chatml, max_length=64)


def test_on_bad_row_skip_skips_a_non_utf8_line(tmp_path, chatml):
    ds = load_chat_dataset(_non_utf8_file(tmp_path), chatml, max_length=64, on_bad_row="skip")
    assert len(ds) == 2 and ds.stats.rows == 3 and ds.stats.skipped == {"invalid_utf8": 1}
    assert "line 2" in ds.stats.skipped_where[0]


def test_empty_data_file_and_all_rows_skipped(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match=rf"{empty}: no rows \(the files are empty\)"):
        load_chat_dataset(empty, NO_TOKENIZER, max_length=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\nnot json\n')
    with pytest.raises(DataError, match=r"no usable example among 2 rows: 2 skipped as bad rows") as e:
        load_chat_dataset(bad, NO_TOKENIZER, max_length=64, on_bad_row="skip")
    assert f"{bad} line 1" in str(e.value) and "'unknown_role': 1" in str(e.value)


def test_empty_directory_as_data_source(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(DataError, match=rf"data source '{d}': the directory is empty; expected \.jsonl") as e:
        load_chat_dataset(str(d), NO_TOKENIZER, max_length=64)
    assert "datasets" not in str(e.value).split(";")[0]


# --- checkpoints and model configs ----------------------------------------------


def _model_dir(tmp_path: Path, config: dict, weights: bytes | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def _safetensors_bytes(tmp_path: Path) -> bytes:
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((64, 16), np.float32)}, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_names_the_file(tmp_path, damage):
    good = _safetensors_bytes(tmp_path)
    weights = {"truncated": good[: len(good) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    d = _model_dir(tmp_path, TINY_HF_CONFIG, weights)
    with pytest.raises(CheckpointError, match=rf"{d / 'model.safetensors'}: .*truncated or damaged"):
        load_hf(d)


def test_damaged_safetensors_is_one_error_line_in_the_eval_tools(tmp_path, capsys):
    from focusft_jax.evaluation.cli import run_cli

    d = _model_dir(tmp_path, TINY_HF_CONFIG, os.urandom(100))
    assert run_cli(lambda: load_hf(d) and 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {d / 'model.safetensors'}")


@pytest.mark.parametrize(
    "change, named",
    [
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
        ({"num_key_value_heads": 3}, r"num_kv_heads: num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ],
)
def test_impossible_hf_config_names_config_json(tmp_path, change, named):
    d = _model_dir(tmp_path, {**TINY_HF_CONFIG, **change})
    with pytest.raises(CheckpointError, match=rf"{d / 'config.json'}: {named}"):
        load_hf(d)


def test_mesh_larger_than_the_devices_names_mesh_data():
    n = jax.device_count()
    with pytest.raises(ConfigError, match=rf"mesh\.data \({n + 2}\) x mesh\.fsdp \(1\) x mesh\.tensor \(1\) = "
                       rf"{n + 2} devices, but there are only {n} device"):
        make_mesh(n + 2, 1, 1)
    if n % 3:
        with pytest.raises(ConfigError, match=rf"mesh\.fsdp \(3\).* do not divide the {n} device"):
            make_mesh(-1, 3, 1)


# --- output directory and tokenizer -----------------------------------------------


def test_output_dir_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=rf"train\.output_dir: {f} is a file"):
        run_dir.create(f)
    with pytest.raises(ConfigError, match=rf"train\.output_dir: cannot create or write the directory {f / 'run'}"):
        run_dir.create(f / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match=rf"train\.output_dir: cannot create or write the directory {ro}"):
            run_dir.create(ro)
    run_dir.create(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_tokenizer_directory_without_tokenizer_files(tmp_path):
    d = _model_dir(tmp_path, TINY_HF_CONFIG)  # a model directory, but no tokenizer files
    cfg = SimpleNamespace(model=SimpleNamespace(tokenizer=str(d), path=None))
    with pytest.raises(ConfigError, match=rf"model\.tokenizer: {d} has no tokenizer files") as e:
        job.build_tokenizer(cfg, tmp_path / "out", print, None)
    assert "chat template" not in str(e.value)


# --- train.py: one error line, exit 2 ------------------------------------------------


@pytest.mark.parametrize(
    "sets, named",
    [
        (["mesh.data={n}"], "mesh.data ({n})"),
        (["train.output_dir={file}"], "train.output_dir: {file} is a file"),
        (["model.init.num_kv_heads=3"], "model.init.num_kv_heads: num_heads (4) must be a multiple"),
        (["model.init.hidden_size=0"], "model.init.hidden_size: must be >= 1, got 0"),
    ],
)
def test_train_main_prints_one_error_line_and_exits_2(tmp_path, capsys, sets, named):
    import train

    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_YAML)
    file = tmp_path / "file"
    file.write_text("x")
    fill = dict(n=jax.device_count() + 1, file=file)
    argv = ["--config", str(config), "--set", f"train.output_dir={tmp_path / 'run'}"]
    for s in sets:
        argv += ["--set", s.format(**fill)]
    assert train.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named.format(**fill) in err[0], captured.err
    assert captured.out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "source, named, hidden",
    [
        ("{tmp}/missing.jsonl", "data source '{tmp}/missing.jsonl': no such file or directory", None),
        ("{tmp}/rows.csv", "data source '{tmp}/rows.csv': unsupported file type '.csv'", None),
        ("{tmp}/*.parquet", "data source '{tmp}/*.parquet': the pattern matches no file", None),
        ("hf:someone/chats", "the Hugging Face dataset 'someone/chats' (data.train entry 'hf:someone/chats') "
         "needs the Hugging Face `datasets` package", "datasets"),
        ("tfds:tiny_chat", "the TFDS dataset 'tfds:tiny_chat' (data.train entry) needs `tensorflow-datasets`",
         "tensorflow_datasets"),
    ],
)
def test_train_main_bad_data_source_is_one_error_line(tmp_path, capsys, monkeypatch, source, named, hidden):
    """Before any work (no tokenizer loaded, no run directory made)."""
    import train

    if hidden:  # as if the optional package were not installed: `import` raises ImportError
        monkeypatch.setitem(sys.modules, hidden, None)

    tok = build_test_tokenizer(tmp_path / "tok")
    (tmp_path / "rows.csv").write_text("a,b\n")
    config = tmp_path / "c.yaml"
    config.write_text(TRAIN_YAML.replace("  builtin: {num_examples: 8, context_tokens: [0], seed: 0}\n", ""))
    argv = ["--config", str(config), "--set", f"train.output_dir={tmp_path / 'run'}", "--set", f"model.tokenizer={tok}",
            "--set", f"data.train=[{source.format(tmp=tmp_path)}]"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and named.format(tmp=tmp_path) in err[-1], err
    assert not any("Traceback" in line for line in err) and not (tmp_path / "run").exists()

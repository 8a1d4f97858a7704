"""Reusing an output directory (focusft_jax/run_dir.py): a resume with a
changed config, a fresh start on a previous run. Plain functions on configs
and temporary directories; nothing is trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from focusft_jax import run_dir
from focusft_jax.config import ConfigError, dump_config, load_config

MINIMAL = """
model:
  path: some/model
data:
  train: [data.jsonl]
"""


def _cfg(tmp_path: Path, *sets: str):
    p = tmp_path / "c.yaml"
    p.write_text(MINIMAL)
    return load_config(p, [f"train.output_dir={tmp_path / 'run'}", *sets])


def _previous_run(tmp_path: Path, *sets: str) -> Path:
    """A directory as a finished run leaves it: config.yaml and a checkpoint at step 5."""
    out = tmp_path / "run"
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # unfinished: not a step
    dump_config(_cfg(tmp_path, *sets), out / "config.yaml")
    return out


def test_changed_lr_is_refused_naming_the_keys_and_the_ways_on(tmp_path):
    out = _previous_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        run_dir.prepare(_cfg(tmp_path, "optim.lr=2e-5", "train.seed=1"), out, log=lambda m: None)
    msg = str(e.value)
    assert "step 5" in msg
    assert "optim.lr: 1e-05 -> 2e-05" in msg and "train.seed: 0 -> 1" in msg
    assert "new train.output_dir" in msg and "train.allow_config_change=[optim.lr,train.seed]" in msg
    assert not (out / "config_history.jsonl").exists()


def test_harmless_changes_resume(tmp_path):
    out = _previous_run(tmp_path)
    # written before train.overwrite / allow_config_change existed: their defaults
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("  allow_config_change: []\n", "").replace("  overwrite: false\n", ""))
    assert "overwrite" not in (out / "config.yaml").read_text()
    cfg = _cfg(tmp_path, "logging.every_steps=5", "train.max_steps=100", "mesh.data=1", "checkpoint.keep=1")
    assert run_dir.prepare(cfg, out, log=lambda m: None) == 5
    (record,) = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert record["changes"] == {}
    assert record["harmless"]["train.max_steps"] == {"old": None, "new": 100}


def test_allow_config_change_resumes_and_records_the_change(tmp_path):
    out = _previous_run(tmp_path)
    logs = []
    cfg = _cfg(tmp_path, "optim.lr=2e-5", "train.allow_config_change=[optim.lr]")
    assert run_dir.prepare(cfg, out, log=logs.append) == 5
    (record,) = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert record["resumed_from_step"] == 5 and record["time"]
    assert record["changes"] == {"optim.lr": {"old": 1e-5, "new": 2e-5}}
    assert any("optim.lr" in m and "config_history.jsonl" in m for m in logs)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.allow_config_change=[optim.lrr]"], "'optim.lrr' is not a config key"),
        (["train.overwrite=true"], "needs checkpoint.resume: false"),
    ],
)
def test_bad_reuse_settings_are_config_errors(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, *sets)


def test_refused_resume_leaves_config_yaml_unchanged_through_train_py(tmp_path, capsys, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)  # train() checks that data.train's files exist before the resume
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    out = _previous_run(tmp_path)
    before = (out / "config.yaml").read_bytes()
    (tmp_path / "c.yaml").write_text(MINIMAL)
    code = train.main(["--config", str(tmp_path / "c.yaml"), "--set", f"train.output_dir={out}",
                       "--set", "method.num_inner_steps=0"])
    assert code == 2
    assert "method.num_inner_steps: 2 -> 0" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == before


def test_fresh_start_on_a_previous_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"previous run \(metrics.jsonl\).*train.overwrite: true"):
        run_dir.prepare(_cfg(tmp_path, "checkpoint.resume=false"), out, log=lambda m: None)
    assert (out / "metrics.jsonl").exists()


def test_overwrite_removes_the_trainers_files_only(tmp_path):
    out = _previous_run(tmp_path)
    for name in ("metrics.jsonl", "hf/model.safetensors", "tensorboard/events", "tokenizer/tokenizer.json",
                 "data/builtin.jsonl", "config_history.jsonl", "notes.txt", "data/mine.jsonl"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    logs = []
    cfg = _cfg(tmp_path, "checkpoint.resume=false", "train.overwrite=true")
    assert run_dir.prepare(cfg, out, log=logs.append) is None
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["data", "data/mine.jsonl", "notes.txt"]
    assert any("removed the previous run" in m for m in logs)


def test_overwrite_keeps_what_the_config_reads(tmp_path):
    out = _previous_run(tmp_path)
    (out / "hf").mkdir()
    (out / "hf" / "model.safetensors").write_text("x")
    logs = []
    cfg = _cfg(tmp_path, "checkpoint.resume=false", "train.overwrite=true", f"model.path={out / 'hf'}")
    run_dir.prepare(cfg, out, log=logs.append)
    assert (out / "hf" / "model.safetensors").exists() and not (out / "checkpoints").exists()
    assert any("kept" in m and "reads from it" in m for m in logs)

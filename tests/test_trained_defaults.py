"""focusft.json (focusft_jax.training_record): the export records how the
model was trained, and the evaluation tools choose their unset options from
it (eval.trained_defaults), print each choice, and warn when an explicit
option contradicts it (issue 12). No model is run: BABILong --prompts-only
and RULER --generate-only read the record and the context the same way a
checkpoint's evaluation does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from focusft_jax.evaluation import babilong, ruler
from focusft_jax.evaluation.trained_defaults import Defaults
from focusft_jax import hf
from focusft_jax.config import load_config
from focusft_jax.errors import CheckpointError
from focusft_jax.training_record import FILENAME, KEYS, read_training_record, training_record, write_training_record
from tests.data_fixtures import build_test_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _record(**changes) -> dict:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in changes.items()])
    return training_record(cfg, 12, 4096)


def _model_dir(tmp_path: Path, record: dict | None, context: int = 4096) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": context}))
    if record is not None:
        write_training_record(d, record)
    return d


def test_the_record_of_the_tiny_default():
    r = _record()
    assert list(r) == list(KEYS)
    assert (r["objective"], r["attention"], r["initialization"], r["base_model"]) == ("focusft", "glm_bidir", "from_scratch", None)
    assert (r["step"], r["context_length"], r["max_position_embeddings"]) == (12, 512, 4096)
    assert r["method"]["num_inner_steps"] == 2 and r["method"]["targets"] == ["gate_proj", "up_proj", "down_proj"]
    assert r["data"]["babilong_prompt_parts"] == [] and r["data"]["chat_template"] is True
    sft = _record(**{"method.num_inner_steps": 0, "method.attention": "causal", "data.builtin": "null",
                     "data.train": "[x.jsonl]", "model.path": "Qwen/Qwen2.5-7B", "model.init": "null"})
    assert (sft["objective"], sft["attention"], sft["initialization"]) == ("sft", "causal", "pretrained")
    assert sft["data"]["babilong_prompt_parts"] is None and sft["data"]["train"] == ["x.jsonl"]
    json.dumps(r, allow_nan=False)  # plain JSON


def test_damaged_or_foreign_record_names_the_file(tmp_path):
    d = _model_dir(tmp_path, None)
    assert read_training_record(d) is None
    (d / FILENAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{d / FILENAME}: not valid JSON"):
        read_training_record(d)
    (d / FILENAME).write_text('{"format": 7}')
    with pytest.raises(CheckpointError, match="of format 1, got format 7"):
        read_training_record(d)
    (d / FILENAME).write_text('{"format": 1, "step": 3}')
    with pytest.raises(CheckpointError, match="missing keys"):
        read_training_record(d)


def test_export_writes_the_record_and_drops_a_stale_one(tmp_path):
    from tests.test_hf_export_atomic import CFG, _params

    out = tmp_path / "hf"
    hf.save_hf(out, CFG, _params(0), training_record=_record())
    assert read_training_record(out)["step"] == 12
    assert "focusft" not in (out / "config.json").read_text()  # never inside config.json
    hf.save_hf(out, CFG, _params(1))  # an export without a record: the old one no longer describes it
    assert not (out / FILENAME).exists()


def _prompts_only(tmp_path, model, *extra):
    out = tmp_path / "out"
    argv = ["--prompts-only", "--checkpoint", str(model), "--data", "generate", "--tasks", "qa1", "--samples", "1",
            "--out", str(out), *extra]
    assert babilong.main(argv) == 0
    rows = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "manifest.json").read_text())


def test_babilong_chooses_from_the_record_and_says_so(tmp_path, capsys):
    model = _model_dir(tmp_path, _record())
    rows, m = _prompts_only(tmp_path, model)
    err = capsys.readouterr().err
    assert "--prefill-attention glm_bidir (trained from scratch with the glm_bidir mask" in err
    assert "--prompt-parts '' (the parts of the training prompts" in err
    assert "--lengths 0k,1k,2k,4k (the default lengths up to the model's context, 4096 tokens)" in err
    assert m["lengths"] == ["0k", "1k", "2k", "4k"] and m["prefill_attention"] == "glm_bidir" and m["prompt_parts"] == []
    assert m["training_record"]["step"] == 12 and set(m["defaults_chosen"]) == {"--prefill-attention", "--prompt-parts", "--lengths"}
    assert all(r["prompt"].startswith("<context>") for r in rows)  # no instruction, examples or post prompt
    assert "warning" not in err


def test_babilong_explicit_choices_that_contradict_the_record_are_kept_with_a_warning(tmp_path, capsys):
    model = _model_dir(tmp_path, _record())
    rows, m = _prompts_only(tmp_path, model, "--prefill-attention", "causal", "--prompt-parts",
                            "instruction,examples,post_prompt", "--lengths", "0k", "--chat-template", "off")
    err = capsys.readouterr().err
    assert "warning: --prefill-attention causal: this model was trained from scratch with the glm_bidir mask only" in err
    assert "warning: --prompt-parts instruction,examples,post_prompt: the training prompts had none of" in err
    assert "warning: --chat-template off: this model was trained on chat messages" in err
    assert m["prefill_attention"] == "causal" and m["prompt_parts"] == ["instruction", "examples", "post_prompt"]
    assert m["defaults_chosen"] == {} and m["lengths"] == ["0k"]
    assert not rows[0]["prompt"].startswith("<context>")


def test_a_model_without_a_record_gets_the_official_defaults(tmp_path, capsys):
    model = _model_dir(tmp_path, None, context=32768)
    _, m = _prompts_only(tmp_path, model)
    assert m["prefill_attention"] == "causal" and m["prompt_parts"] == ["instruction", "examples", "post_prompt"]
    assert m["lengths"] == list(babilong.DEFAULT_LENGTHS) and m["training_record"] is None
    assert capsys.readouterr().err == ""


def test_babilong_a_damaged_record_is_one_error_line(tmp_path, capsys):
    model = _model_dir(tmp_path, None)
    (model / FILENAME).write_text("[]")
    assert babilong.main(["--prompts-only", "--checkpoint", str(model), "--data", "generate", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model / FILENAME}: expected a focusft-jax training record")


def test_ruler_lengths_and_prefill_from_the_model(tmp_path, capsys):
    model = _model_dir(tmp_path, _record())
    tok = build_test_tokenizer(tmp_path / "tok")
    out = tmp_path / "r"
    argv = ["--generate-only", "--checkpoint", str(model), "--tokenizer", tok, "--tasks", "niah_single_1",
            "--samples", "1", "--out", str(out)]
    assert ruler.main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["lengths"] == [4096] and m["prefill_attention"] == "glm_bidir"
    assert "--lengths 4096 (the default lengths up to the model's context, 4096 tokens)" in capsys.readouterr().err


def test_generate_chat_and_prefill_defaults(tmp_path):
    logged = []
    d = Defaults(_model_dir(tmp_path, _record(**{"method.attention": "causal"})), log=logged.append)
    assert d.chat(None) is True and d.prefill_attention(None) == "causal"
    assert d.chat(False) is False and d.prefill_attention("glm_bidir") == "glm_bidir"
    assert logged[0].startswith("--chat on (trained on chat messages")
    assert logged[1].startswith("warning: --chat off: this model was trained on chat messages")
    assert logged[2].startswith("warning: --prefill-attention glm_bidir: this model was trained with causal attention")
    none = Defaults(None, log=logged.append)
    assert none.chat(None) is False and none.prefill_attention(None) == "causal" and len(logged) == 3
    from focusft_jax.evaluation.generate import parse_args

    assert parse_args(["--checkpoint", "m", "--prompt", "x"]).chat is None
    assert parse_args(["--checkpoint", "m", "--prompt", "x", "--no-chat"]).chat is False

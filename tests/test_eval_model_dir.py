"""The evaluation tools' shared pieces: EOS / pad id precedence (one home,
`eval.model_dir`), the shared command-line options and error reporting
(`eval.cli`). No model: configs and tokenizers are plain stand-ins."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from focusft_jax.evaluation.cli import add_model_options, add_run_options, run_cli
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.model_dir import eos_ids, pad_id, special_ids
from focusft_jax.errors import CheckpointError, ConfigError, DataError


def _model(root, hf_config: dict, generation_config: dict | str | None = None):
    """A stand-in HFModel: its config.json dict and a source directory holding
    `generation_config` (JSON, or raw text) when given."""
    root.mkdir(parents=True, exist_ok=True)
    if generation_config is not None:
        text = generation_config if isinstance(generation_config, str) else json.dumps(generation_config)
        (root / "generation_config.json").write_text(text)
    return SimpleNamespace(hf_config=hf_config, source_dir=root)


def _tok(eos=None, pad=None):
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad)


def test_eos_ids_generation_config_then_config_then_tokenizer(tmp_path):
    assert eos_ids(_model(tmp_path / "a", {"eos_token_id": 5}, {"eos_token_id": [7, 8]}), _tok(9)) == [7, 8]
    assert eos_ids(_model(tmp_path / "b", {"eos_token_id": 5}, {"bos_token_id": 1}), _tok(9)) == [5]
    assert eos_ids(_model(tmp_path / "c", {}), _tok(9)) == [9]
    assert eos_ids(_model(tmp_path / "c", {"eos_token_id": None}), _tok()) == []


def test_pad_id_tokenizer_then_generation_config_then_config_then_eos(tmp_path):
    m = _model(tmp_path / "m", {"pad_token_id": 3}, {"pad_token_id": 4})
    assert pad_id(m, _tok(pad=2), [7]) == 2
    assert pad_id(m, _tok(), [7]) == 4
    assert pad_id(SimpleNamespace(hf_config={"pad_token_id": 3}, source_dir=None), _tok(), [7]) == 3
    assert pad_id(SimpleNamespace(hf_config={}, source_dir=None), _tok(), [7, 8]) == 7
    assert pad_id(SimpleNamespace(hf_config={}, source_dir=None), _tok(), []) == 0
    assert special_ids(m, _tok(eos=6)) == ([6], 4)


def test_invalid_generation_config_is_an_error_naming_the_file(tmp_path):
    m = _model(tmp_path / "m", {"eos_token_id": 5}, "{not json")
    with pytest.raises(EvalError, match="generation_config.json"):
        eos_ids(m, _tok())


def test_shared_options_and_their_defaults():
    ap = argparse.ArgumentParser()
    add_model_options(ap)
    add_run_options(ap)
    args = ap.parse_args(["--out", "o"])
    # --prefill-attention unset: eval.trained_defaults chooses it for the model (causal without a record)
    assert (args.checkpoint, args.prefill_attention, args.attention_impl) == (None, None, "auto")
    assert (args.chat_template, args.batch_size, args.out, args.no_progress) == ("auto", 1, "o", False)
    strict = argparse.ArgumentParser()
    add_model_options(strict, checkpoint_required=True)
    with pytest.raises(SystemExit):
        strict.parse_args([])


@pytest.mark.parametrize("error", [EvalError, DataError, ConfigError, CheckpointError])
def test_run_cli_reports_user_errors_with_exit_2(error, capsys):
    def body():
        raise error("the file x is bad")

    assert run_cli(body) == 2
    assert capsys.readouterr().err == "error: the file x is bad\n"
    assert run_cli(lambda: 0) == 0
    with pytest.raises(RuntimeError):  # anything else is a bug: its traceback is kept
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("bug")))

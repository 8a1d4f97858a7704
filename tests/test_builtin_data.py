"""The built-in RULER niah data (data.builtin.kind: niah): the training rows
are RULER's own task text and answer, rendered as the evaluation prompts the
model with, sized by the budget, seeded apart from the evaluation's samples."""
from __future__ import annotations

import re
import statistics

import pytest

from focusft_jax.config import BuiltinDataConfig
from focusft_jax.data.synthetic import builtin_records
from focusft_jax.errors import DataError
from focusft_jax.evaluation import ruler_data as rd
from focusft_jax.evaluation.ruler import sample_score
from focusft_jax.evaluation.tokenizing import chat_wrap
from focusft_jax.tokenizer import build_chat_tokenizer

NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")


def _records(**kw):
    cfg = dict(kind="niah", tasks=["niah_single_1"], num_examples=40, context_tokens=[0, 80, 160], seed=0)
    cfg.update(kw)
    return list(builtin_records(BuiltinDataConfig(**cfg)))


def test_rows_are_ruler_task_texts_answered_after_the_official_prefix():
    rows = _records()
    for r in rows:
        user, assistant = (m["content"] for m in r["messages"])
        needles = NEEDLE.findall(user)
        assert len(needles) == 1, user
        key, value = needles[0]
        assert user.startswith("A special magic number is hidden within the following text.")
        assert user.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
        prefix = f" The special magic number for {key} mentioned in the provided text is"
        assert assistant == f"{prefix} {value}."
        # RULER's scorer accepts what the model is trained to continue the pre-filled prefix with
        assert sample_score("niah_single_1", assistant[len(prefix):], [value]) == 1.0
        assert sample_score("niah_single_1", assistant[len(prefix):], [str(int(value) + 1)]) == 0.0
    # the noise lines between needle and question grow with the drawn budget
    lines = [r["messages"][0]["content"].count("The grass is green.") for r in rows]
    assert min(lines) == 1 and max(lines) >= 6 and len(set(lines)) == 3


def test_training_text_starts_with_the_evaluation_prompt(tmp_path):
    """Rendered with the chat template, a training row is the RULER
    evaluation's prompt (chat-wrapped task text + answer prefix) followed by
    the answer: the model learns exactly the continuation it is scored on."""
    rows = _records(num_examples=6)
    tok = build_chat_tokenizer([m["content"] for r in rows for m in r["messages"]], tmp_path / "tok", vocab_size=300)
    for r in rows:
        user, assistant = (m["content"] for m in r["messages"])
        prefix = assistant[: assistant.rindex(" is ") + 3]
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        assert text.startswith(chat_wrap(tok, user) + prefix)
        assert text[len(chat_wrap(tok, user) + prefix):].startswith(assistant[len(prefix):] + "<|im_end|>")


def test_deterministic_in_the_seed_and_apart_from_the_evaluation_samples(tmp_path):
    rows = _records(num_examples=60)
    assert rows == _records(num_examples=60)
    assert rows != _records(num_examples=60, seed=1)
    trained = {NEEDLE.findall(r["messages"][0]["content"])[0] for r in rows}
    tok = build_chat_tokenizer([m["content"] for r in rows for m in r["messages"]], tmp_path / "tok", vocab_size=300)
    evaluated = rd.generate_samples("niah_single_1", 1024, 30, rd.Formatter(tok, True), seed=42)
    values = {v for _, v in trained}
    assert all(s["outputs"][0] not in values for s in evaluated)


def test_needle_haystack_task_and_budgets():
    rows = _records(tasks=["niah_multikey_2"], num_examples=10, context_tokens=[200])
    for r in rows:
        user, assistant = (m["content"] for m in r["messages"])
        asked = re.search(r"special magic number for (\S+) mentioned", user).group(1)
        lines = dict(NEEDLE.findall(user))
        assert len(lines) > 3 and assistant.endswith(f" {lines[asked]}.")
    assert statistics.fmean(len(r["messages"][0]["content"]) for r in rows) > 600


@pytest.mark.parametrize("task", ["niah_single_2", "qa1", "vt"])
def test_tasks_outside_the_corpus_free_niah_are_refused_by_name(task):
    with pytest.raises(DataError, match=rf"data.builtin.tasks: '{task}' is not a corpus-free RULER niah task; "
                                        r"expected one of \['niah_single_1', 'niah_multikey_2', 'niah_multikey_3'\]"):
        _records(tasks=[task])


def test_the_run_summary_names_the_evaluation_of_its_own_task():
    from focusft_jax.config import load_config
    from focusft_jax.job import evaluation_of
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    niah = evaluation_of(load_config(root / "configs" / "tiny_niah.yaml"), Path("r/hf"), Path("r"))
    assert niah.endswith("ruler --checkpoint r/hf --tasks niah_single_1 --lengths 384 --samples 50 "
                         "--batch-size 25 --out r/ruler")
    babi = evaluation_of(load_config(root / "configs" / "tiny.yaml"), Path("r/hf"), Path("r"))
    assert babi.endswith("babilong --checkpoint r/hf --data generate --samples 20 --batch-size 20 --out r/eval")

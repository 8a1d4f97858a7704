"""End to end: `python -m eval.babilong` and `python -m eval.ruler` (their
`main(argv)`, in process) on a tiny random model at tiny lengths, with every
output file checked, and the outputs compared with what
`focusft_jax.generate.generate` produces for the same prompts.

The model directory is what a user evaluates: a byte-level BPE chat tokenizer
from `build_chat_tokenizer`, trained on bAbI-like sentences and the RULER
template words (so prompts tokenize compactly), and a tiny random Llama with
the tokenizer's vocabulary written by `save_hf`. (Llama, not Qwen2: with
transformers 5, `AutoTokenizer` on a directory whose config.json says qwen2
swaps in Qwen2's pre-tokenizer, which splits digits one by one, so the trained
merges of numbers would not apply and the RULER prompts would not fit 1024.)

RULER runs at length 1024: the CLI takes any positive token count; 1024 is not
an official RULER length, it keeps this test fast.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from focusft_jax.evaluation import babilong as bl
from focusft_jax.evaluation import ruler as rl
from focusft_jax.evaluation import ruler_data as rd
from focusft_jax.evaluation import runner
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.jsonio import read_jsonl
from focusft_jax.evaluation.manifest import MANIFEST_KEYS, load_benchmark
from focusft_jax.evaluation.runner import length_sorted_batches, prefill_attention_impl
from focusft_jax.evaluation.tokenizing import chat_wrap, count_tokens, load_tokenizer, missing_tokenizer, use_chat_template

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RULER_TASKS = ("niah_single_1", "vt", "cwe", "fwe")
RULER_LENGTH = 1024


# ---------------------------------------------------------------- the model directory


def _training_texts() -> list[str]:
    from focusft_jax.evaluation import wordlists
    from focusft_jax.data.babi import babi_story, filler_sentences

    rng = random.Random(0)
    texts = [json.dumps(load_benchmark("babilong")), json.dumps(load_benchmark("ruler"))]
    texts += list(filler_sentences(0, 3000))
    for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
        for i in range(30):
            facts, question, answer = babi_story(task, random.Random(f"{task}:{i}"))
            texts.append(" ".join(facts) + f" {question} {answer}")
    # RULER: numbered word lists (cwe), key words (niah), numbers (values)
    texts += [" ".join(f"{i}. {w}" for i, w in enumerate(wordlists.cwe_words()))] * 2
    texts += [" ".join(wordlists.nouns()), " ".join(wordlists.adjectives())]
    texts += [" ".join(f"{i}." for i in range(1, 400))] * 20
    texts += [" ".join(str(rng.randint(10**6, 10**7 - 1)) for _ in range(50)) for _ in range(20)]
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import jax

    from focusft_jax.hf import save_hf
    from focusft_jax.model import ModelConfig, init_params
    from focusft_jax.tokenizer import build_chat_tokenizer

    root = tmp_path_factory.mktemp("e2e")
    tok = build_chat_tokenizer(_training_texts(), root / "tok", vocab_size=4096)
    cfg = ModelConfig(
        family="llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
    )
    # a large init scale keeps the logits far from ties (outputs are compared exactly)
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    hf_ids = {"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return save_hf(root / "model", cfg, params, hf_config=hf_ids, tokenizer_dir=root / "tok")


def _generate_directly(model_dir, token_ids, max_new_tokens, prefill_attention="causal", attention_impl="dense"):
    """Continuations (text, special tokens skipped) straight from focusft_jax."""
    from focusft_jax.generate import generate
    from focusft_jax.hf import load_hf

    model = load_hf(model_dir)
    tok = load_tokenizer(model_dir)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    new = generate(
        model.cfg.replace(attention_impl=attention_impl),
        model.params,
        token_ids,
        max_new_tokens,
        eos_ids=[gen_cfg["eos_token_id"]],
        pad_id=gen_cfg["pad_token_id"],
        prefill_attention=prefill_attention,
    )
    return [tok.decode(n, skip_special_tokens=True) for n in new]


def _check_manifest(m, **expect):
    missing = [k for k in MANIFEST_KEYS if k not in m]
    assert not missing, missing
    for k, v in expect.items():
        assert m[k] == v, (k, m[k], v)
    assert m["tokenizer"] and m["decoding"]["strategy"] == "greedy"
    assert set(m["attention_impl"]) >= {"setting", "prefill", "decode"}
    assert m["software"]["jax"] and m["created_utc"].endswith("Z")


# ---------------------------------------------------------------- BABILong


def test_babilong_end_to_end(model_dir, tmp_path):
    out = tmp_path / "babilong"
    argv = [
        "--checkpoint", str(model_dir), "--data", "generate", "--tasks", "qa1,qa2", "--lengths", "0k,1k",
        "--samples", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert bl.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"predictions.jsonl", "results.json", "results.md", "heatmap.png"}
    tok = load_tokenizer(model_dir)
    assert use_chat_template(tok, "auto")  # build_chat_tokenizer writes one: chat on

    preds = read_jsonl(out / "predictions.jsonl")
    assert [(p["task"], p["length"], p["index"]) for p in preds] == [
        (t, l, i) for t in ("qa1", "qa2") for l in ("0k", "1k") for i in range(2)
    ]
    for p in preds:
        assert set(p) == {"task", "length", "index", "prompt", "question", "target", "output", "correct", "prompt_tokens"}
        # the official template around the generated context and question
        context = p["prompt"].split("<context>\n", 1)[1].rsplit("\n</context>", 1)[0]
        assert p["prompt"] == bl.format_prompt(p["task"], context, p["question"])
        assert p["prompt"].endswith(f"Question: {p['question']}")
        assert p["target"] in bl.task_labels(p["task"])
        model_input = chat_wrap(tok, p["prompt"])
        assert model_input.startswith("<|im_start|>user\n") and model_input.endswith("<|im_start|>assistant\n")
        assert p["prompt_tokens"] == count_tokens(tok, model_input, add_special_tokens=False)
        assert p["output"] == p["output"].strip()
        assert p["correct"] == bl.score_prediction(p["task"], p["target"], p["output"], p["question"])
    by = {(p["task"], p["length"], p["index"]): p for p in preds}
    assert by[("qa1", "1k", 0)]["prompt_tokens"] > by[("qa1", "0k", 0)]["prompt_tokens"] + 300

    # outputs are exactly what our generation produces for those prompts
    # (batch size 1: each prompt ran alone, as here)
    for key in [("qa1", "0k", 0), ("qa2", "1k", 1)]:
        p = by[key]
        ids = tok(chat_wrap(tok, p["prompt"]), add_special_tokens=False)["input_ids"]
        assert len(ids) == p["prompt_tokens"]
        (want,) = _generate_directly(model_dir, [ids], bl.MAX_NEW_TOKENS)
        assert p["output"] == want.strip() and want.strip(), key

    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "BABILong-format (regenerated)"
    assert res["tasks"] == ["qa1", "qa2"] and res["lengths"] == ["0k", "1k"]
    for t in ("qa1", "qa2"):
        for l in ("0k", "1k"):
            cell = [p["correct"] for p in preds if p["task"] == t and p["length"] == l]
            assert res["accuracy"][t][l] == pytest.approx(100.0 * sum(cell) / len(cell))
            assert res["samples"][t][l] == 2
    for l in ("0k", "1k"):
        assert res["mean_qa1_qa5"][l] == pytest.approx((res["accuracy"]["qa1"][l] + res["accuracy"]["qa2"][l]) / 2)
    assert res["mean_qa1_qa5_tasks"] == ["qa1", "qa2"] and "refused" not in res
    _check_manifest(
        res["manifest"],
        checkpoint=str(model_dir),
        benchmark="BABILong-format (regenerated)",
        tasks=["qa1", "qa2"],
        lengths=["0k", "1k"],
        samples={"qa1": {"0k": 2, "1k": 2}, "qa2": {"0k": 2, "1k": 2}},
        chat_template=True,
        prompt_parts=list(bl.PROMPT_PARTS),
        decoding=bl.DECODING,
        seed=0,
        wordlist_version=None,
        prefill_attention="causal",
        max_context=8192,
        prompt_name="instruction_yes_examples_yes_post_prompt_yes_chat_template_yes",
    )
    assert res["manifest"]["data_source"]["label"] == "BABILong-format (regenerated)"
    assert res["manifest"]["attention_impl"]["setting"] == "auto"

    md = (out / "results.md").read_text()
    assert md.startswith("# BABILong-format (regenerated): accuracy (%)")
    assert "| task | 0k | 1k |" in md and "| mean qa1/qa2 (2 of qa1-qa5) |" in md and "## Settings" in md
    assert (out / "heatmap.png").read_bytes()[:8] == PNG_MAGIC


def test_babilong_plain_prompts_glm_bidir_blockwise(model_dir, tmp_path):
    """Chat template off (plain text with the tokenizer's special tokens),
    glm_bidir prefill, blockwise attention forced for the prefill."""
    out = tmp_path / "plain"
    argv = [
        "--checkpoint", str(model_dir), "--data", "generate", "--tasks", "qa1", "--lengths", "0k", "--samples", "2",
        "--chat-template", "off", "--prefill-attention", "glm_bidir", "--attention-impl", "blockwise",
        "--prompt-parts", "instruction,post_prompt", "--batch-size", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert bl.main(argv) == 0
    tok = load_tokenizer(model_dir)
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 2 and all("<example>" not in p["prompt"] for p in preds)
    ids = [tok(p["prompt"])["input_ids"] for p in preds]
    assert [len(x) for x in ids] == [p["prompt_tokens"] for p in preds]
    order = length_sorted_batches([len(x) for x in ids], 2)[0]  # the batch as the runner formed it
    got = _generate_directly(model_dir, [ids[i] for i in order], 20, "glm_bidir", "blockwise")
    for i, want in zip(order, got):
        assert preds[i]["output"] == want.strip() and want.strip()
    m = json.loads((out / "results.json").read_text())["manifest"]
    assert m["chat_template"] is False and m["prefill_attention"] == "glm_bidir"
    assert m["prompt_parts"] == ["instruction", "post_prompt"] and m["attention_impl"]["prefill"] == "blockwise"
    assert m["prompt_name"] == "instruction_yes_examples_no_post_prompt_yes_chat_template_no"


# ---------------------------------------------------------------- RULER


def test_ruler_end_to_end(model_dir, tmp_path):
    out = tmp_path / "ruler"
    argv = [
        "--checkpoint", str(model_dir), "--tasks", ",".join(RULER_TASKS), "--lengths", str(RULER_LENGTH),
        "--samples", "2", "--chat-template", "off", "--prefill-attention", "glm_bidir", "--batch-size", "2",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert rl.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"samples", "predictions.jsonl", "results.json", "results.md"}
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(f"{t}_{RULER_LENGTH}.jsonl" for t in RULER_TASKS)
    tok = load_tokenizer(model_dir)

    samples = {}
    for t in RULER_TASKS:
        rows = read_jsonl(out / "samples" / f"{t}_{RULER_LENGTH}.jsonl")
        assert [r["index"] for r in rows] == [0, 1]
        for r in rows:
            assert set(r) == {"index", "input", "outputs", "length", "answer_prefix", "prompt_tokens", "units", "chat_template"}
            assert r["chat_template"] is False and r["outputs"] and r["units"] > 0
            n = count_tokens(tok, r["input"] + r["answer_prefix"], add_special_tokens=True)
            assert r["prompt_tokens"] == n and r["length"] == n + rd.tokens_to_generate(t) <= RULER_LENGTH
        samples[t] = rows
    assert all(r["length"] >= 0.97 * RULER_LENGTH for t in ("niah_single_1", "vt") for r in samples[t])

    preds = read_jsonl(out / "predictions.jsonl")
    assert [(p["task"], p["length"], p["index"]) for p in preds] == [(t, RULER_LENGTH, i) for t in RULER_TASKS for i in range(2)]
    for p in preds:
        assert set(p) == {"task", "length", "index", "prompt", "outputs", "output", "prediction", "score"}
        s = samples[p["task"]][p["index"]]
        assert p["prompt"] == s["input"] + s["answer_prefix"] and p["outputs"] == s["outputs"]
        assert p["prediction"] == rl.postprocess_pred(p["output"])
        assert p["score"] == rl.sample_score(p["task"], p["prediction"], p["outputs"])

    # outputs are exactly what our generation produces: vt's two samples ran as one batch of 2
    vt = [p for p in preds if p["task"] == "vt"]
    order = length_sorted_batches([samples["vt"][p["index"]]["length"] for p in vt], 2)[0]
    ids = [tok(vt[i]["prompt"])["input_ids"] for i in order]
    got = _generate_directly(model_dir, ids, rd.tokens_to_generate("vt"), "glm_bidir")
    for i, want in zip(order, got):
        assert vt[i]["output"] == want and want.strip()

    res = json.loads((out / "results.json").read_text())
    L = str(RULER_LENGTH)
    assert res["benchmark"] == "RULER" and res["label"] == "RULER"
    assert res["tasks"] == list(RULER_TASKS) and res["lengths"] == [RULER_LENGTH] and res["skipped"] == {}
    for t in RULER_TASKS:
        cell = [p for p in preds if p["task"] == t]
        assert res["scores"][t][L] == rl.task_score(t, [p["output"] for p in cell], [p["outputs"] for p in cell])
        assert res["metrics"][t] == "string_match_all"
    assert res["average"][L] == round(sum(res["scores"][t][L] for t in RULER_TASKS) / 4, 2)
    assert res["average_tasks"][L] == list(RULER_TASKS) and res["average_covers"][L] == "4 of 13 tasks"
    assert res["overall_average"] == res["average"][L]
    assert res["model_max_context"] == 8192 and res["beyond_model_context"] == []
    _check_manifest(
        res["manifest"],
        checkpoint=str(model_dir),
        benchmark="RULER",
        tasks=list(RULER_TASKS),
        lengths=[RULER_LENGTH],
        samples={t: {L: 2} for t in RULER_TASKS},
        chat_template=False,
        seed=42,
        prefill_attention="glm_bidir",
    )
    m = res["manifest"]
    assert m["decoding"]["tokens_to_generate"] == {t: rd.tokens_to_generate(t) for t in RULER_TASKS}
    assert m["decoding"]["stop_strings"] is None and "answer_prefix" in m["prompt_parts"]
    assert m["wordlist_version"] and m["data_source"]["kind"] == "generated" and m["data_source"]["label"] == "RULER"

    md = (out / "results.md").read_text()
    assert md.startswith("# RULER: scores") and f"| task | {L} |" in md and "| average |" in md
    assert "4 of 13 tasks" in md and "## Settings" in md


# ---------------------------------------------------------------- attention implementation of the eval path


def test_eval_path_uses_blockwise_prefill_for_long_prompts(model_dir, monkeypatch):
    """`auto` picks blockwise (no P x P scores) from BLOCKWISE_FROM_TOKENS
    padded prompt tokens on, dense below; explicit settings are obeyed."""
    import focusft_jax.generate as gen

    assert prefill_attention_impl(runner.BLOCKWISE_FROM_TOKENS - 1) == "dense"
    assert prefill_attention_impl(runner.BLOCKWISE_FROM_TOKENS) == "blockwise"
    assert prefill_attention_impl(10**6, "dense") == "dense"
    assert prefill_attention_impl(1, "blockwise") == "blockwise"
    with pytest.raises(EvalError):
        prefill_attention_impl(1, "flash")

    seen = []

    def fake_generate(cfg, params, prompts, max_new_tokens, **kw):
        seen.append((cfg.attention_impl, max(len(p) for p in prompts)))
        return [[] for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr(runner, "BLOCKWISE_FROM_TOKENS", 64)
    fn = runner.make_generate_fn(model_dir, 1, "causal", 4, add_special_tokens=False)
    assert fn(["Mary went to the kitchen."]) == [""]
    assert fn(["Mary went to the kitchen. " * 40]) == [""]
    assert [s[0] for s in seen] == ["dense", "blockwise"] and seen[1][1] > 64
    assert runner.make_generate_fn(model_dir, 1, "causal", 4, attention_impl="dense")(["x " * 200]) == [""]
    assert seen[-1][0] == "dense"


def test_blockwise_prefill_generates_like_dense(model_dir):
    """Generation with a blockwise prefill (decode steps are dense either way)
    gives the same tokens as a dense prefill on the tiny model."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 4096, size=n).tolist() for n in (300, 77)]
    dense = _generate_directly(model_dir, prompts, 12, "causal", "dense")
    block = _generate_directly(model_dir, prompts, 12, "causal", "blockwise")
    assert dense == block and all(dense)


# ---------------------------------------------------------------- a checkpoint without tokenizer files


def test_missing_tokenizer_is_an_error_naming_the_directory(model_dir, tmp_path, capsys):
    """transformers 5 silently builds an empty tokenizer for a directory with
    config.json but no tokenizer files; the harness refuses it."""
    from focusft_jax.evaluation import generate as eg

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(f, bare / f.name)
    assert missing_tokenizer(model_dir) is None
    with pytest.raises(EvalError) as e:
        load_tokenizer(bare)
    msg = str(e.value)
    assert str(bare) in msg and "no tokenizer" in msg
    assert "tokenizer.json" in msg and "tokenizer_config.json" in msg and "vocab.json" in msg
    with pytest.raises(EvalError, match="no tokenizer"):  # eval.generate shares the check
        eg.load_model(bare)

    capsys.readouterr()
    argv = ["--checkpoint", str(bare), "--data", "generate", "--tasks", "qa1", "--lengths", "0k", "--samples", "1"]
    assert bl.main(argv + ["--out", str(tmp_path / "b")]) == 2
    assert str(bare) in capsys.readouterr().err
    argv = ["--checkpoint", str(bare), "--tasks", "niah_single_1", "--lengths", "1024", "--samples", "1"]
    assert rl.main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "tokenizer.json" in err

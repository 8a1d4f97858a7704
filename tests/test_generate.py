"""Batched KV-cache generation: parity with transformers' generate, EOS
handling, glm_bidir prefill, sampling, and the eval.generate CLI.

Compiled shapes are shared: every greedy call per family uses 3 prompts
bucketed to 16 columns, 16 new tokens and one EOS id, so each family compiles
the causal greedy program once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from focusft_jax.attention import attention_meta
from focusft_jax.generate import bucket_length, generate, generate_tokens, left_pad, sample_logits
from focusft_jax.hf import load_hf
from focusft_jax.model import forward, positions_from_mask
from focusft_jax.tokenizer import build_chat_tokenizer
from tests.tiny_models import FAMILY_CASES, FAMILY_REPRESENTATIVES

REPO = Path(__file__).resolve().parents[1]
N_NEW = 16
PAD = 0
EOS = 2  # the tiny models' eos_token_id
NEVER = -1  # an EOS id no model can emit
_rng = np.random.default_rng(1234)
PROMPTS = [_rng.integers(3, 101, size=n).tolist() for n in (9, 3, 6)]


@pytest.fixture(scope="module", params=FAMILY_REPRESENTATIVES)
def family(request, tiny_model_dir):
    """(case, imported model, transformers model) for each family representative."""
    return (request.param, *_model(tiny_model_dir, request.param))


_MODELS: dict[str, tuple] = {}


def _model(tiny_model_dir, case):
    if case not in _MODELS:
        d = tiny_model_dir(case)
        _MODELS[case] = (load_hf(d), transformers.AutoModelForCausalLM.from_pretrained(d).eval())
    return _MODELS[case]


def _ours(model, prompts, eos, **kw):
    tokens, mask = left_pad(prompts, PAD)
    return generate_tokens(
        model.cfg, model.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(eos, jnp.int32), PAD,
        max_new_tokens=N_NEW, **kw,
    )


def _hf_generate(hf_model, prompts, eos):
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), PAD, dtype=torch.long)
    am = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):] = torch.tensor(row)
        am[i, p - len(row):] = 1
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=N_NEW, pad_token_id=PAD, eos_token_id=eos
        )
    return out[:, p:].numpy()


def _trim(row, eos):
    row = list(row)
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


# ---------------------------------------------------------------- parity


def test_greedy_matches_transformers(family):
    case, model, hf = family
    expected = _hf_generate(hf, PROMPTS, EOS)
    res = _ours(model, PROMPTS, [EOS])
    n = expected.shape[1]
    got = np.asarray(res.tokens)
    np.testing.assert_array_equal(got[:, :n], expected, err_msg=case)
    assert (got[:, n:] == PAD).all()
    assert int(res.steps) == n
    # The host wrapper returns the same completions, cut after the first EOS.
    lists = generate(model.cfg, model.params, PROMPTS, N_NEW, eos_ids=EOS, pad_id=PAD)
    assert lists == [_trim(r, [EOS]) for r in expected.tolist()]
    np.testing.assert_array_equal(np.asarray(res.lengths), [len(x) for x in lists])


def test_eos_stops_one_row_while_others_continue(family):
    case, model, hf = family
    ref = np.asarray(_ours(model, PROMPTS, [NEVER]).tokens)
    assert (ref != PAD).any()
    # An id that row 0 emits at step >= 2 (first occurrence there) and that
    # some other row never emits: row 0 stops early, that row runs to the end.
    eos = None
    for j in range(2, N_NEW - 2):
        cand = int(ref[0, j])
        if cand not in ref[0, :j] and any(cand not in ref[i] for i in (1, 2)):
            eos = cand
            break
    assert eos is not None, f"{case}: no usable EOS candidate in {ref[0]}"
    res = _ours(model, PROMPTS, [eos])
    got = np.asarray(res.tokens)
    stop = int(np.argmax(ref[0] == eos))
    np.testing.assert_array_equal(got[0, : stop + 1], ref[0, : stop + 1])
    assert (got[0, stop + 1:] == PAD).all(), got[0]
    assert bool(res.finished[0]) and int(res.lengths[0]) == stop + 1
    for i in (1, 2):
        want = _trim(ref[i], [eos])
        assert got[i, : len(want)].tolist() == want
        assert (got[i, len(want):] == PAD).all()
    assert int(res.lengths.max()) == N_NEW  # a row that never saw the EOS ran to the end
    # transformers agrees, padding included.
    expected = _hf_generate(hf, PROMPTS, eos)
    assert expected.shape[1] == N_NEW
    np.testing.assert_array_equal(got, expected, err_msg=case)


def test_eos_list_stops_loop_early(tiny_model_dir):
    model, hf = _model(tiny_model_dir, FAMILY_REPRESENTATIVES[1])
    ref = np.asarray(_ours(model, PROMPTS, [NEVER]).tokens)
    eos = sorted({int(ref[0, 3]), int(ref[1, 1]), int(ref[2, 2])})
    while len(eos) < 3:
        eos.append(NEVER)
    res = _ours(model, PROMPTS, eos)
    want = [_trim(r, eos) for r in ref.tolist()]
    lengths = [len(w) for w in want]
    assert max(lengths) <= 4
    assert int(res.steps) == max(lengths) < N_NEW  # the while loop exited early
    assert np.asarray(res.lengths).tolist() == lengths
    assert np.asarray(res.finished).all()
    got = np.asarray(res.tokens)
    for i, w in enumerate(want):
        assert got[i, : len(w)].tolist() == w and (got[i, len(w):] == PAD).all()
    expected = _hf_generate(hf, PROMPTS, eos)
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
    assert generate(model.cfg, model.params, PROMPTS, N_NEW, eos_ids=eos, pad_id=PAD) == want


# ---------------------------------------------------------------- glm_bidir prefill


@pytest.mark.parametrize("case", FAMILY_REPRESENTATIVES[:2])
def test_glm_bidir_prefill_matches_forward(tiny_model_dir, case):
    model, _ = _model(tiny_model_dir, case)
    res = _ours(model, PROMPTS, [NEVER], prefill_attention="glm_bidir")
    gen = np.asarray(res.tokens)
    tokens, mask = left_pad(PROMPTS, PAD)
    p = tokens.shape[1]
    # First token: argmax of a plain forward over the prompt as one bidirectional block.
    meta = attention_meta(jnp.asarray(mask), jnp.zeros_like(jnp.asarray(mask)), kind="glm_bidir")
    logits = forward(model.cfg, model.params, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), meta)
    np.testing.assert_array_equal(gen[:, 0], np.argmax(np.asarray(logits[:, -1]), axis=-1))
    # Every later token: teacher-forced forward where the prompt is the
    # bidirectional context turn and the generated tokens are a causal turn.
    full = np.concatenate([tokens, gen[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(gen[:, :-1])], axis=1)
    loss = np.concatenate([np.zeros_like(mask), np.ones_like(gen[:, :-1])], axis=1)
    meta = attention_meta(jnp.asarray(full_mask), jnp.asarray(loss), kind="glm_bidir")
    logits = forward(model.cfg, model.params, jnp.asarray(full), positions_from_mask(jnp.asarray(full_mask)), meta)
    np.testing.assert_array_equal(gen, np.argmax(np.asarray(logits[:, p - 1:]), axis=-1))
    # ... and it is a different mask from the causal prefill.
    causal = np.asarray(_ours(model, PROMPTS, [NEVER]).tokens)
    assert (causal != gen).any()


# ---------------------------------------------------------------- sampling


def test_sampling_reproducible_and_tiny_top_p_is_greedy(tiny_model_dir):
    model, _ = _model(tiny_model_dir, FAMILY_REPRESENTATIVES[2])

    def sample(seed, temperature=1.5, top_p=1.0, top_k=0):
        return _ours(
            model, PROMPTS, [NEVER], key=jax.random.PRNGKey(seed), temperature=temperature, top_p=top_p,
            top_k=top_k, sample=True,
        )

    a, b, c = (np.asarray(sample(s).tokens) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = np.asarray(_ours(model, PROMPTS, [NEVER]).tokens)
    assert (a != greedy).any()
    np.testing.assert_array_equal(np.asarray(sample(3, top_p=1e-6).tokens), greedy)
    np.testing.assert_array_equal(np.asarray(sample(4, top_k=1).tokens), greedy)
    # Host wrapper: same seed, same completions; temperature 0 is greedy.
    kw = dict(eos_ids=NEVER, pad_id=PAD, temperature=1.5, seed=11)
    s1 = generate(model.cfg, model.params, PROMPTS, N_NEW, **kw)
    assert s1 == generate(model.cfg, model.params, PROMPTS, N_NEW, **kw)
    assert generate(model.cfg, model.params, PROMPTS, N_NEW, eos_ids=NEVER, pad_id=PAD) == greedy.tolist()


def test_sample_logits_top_p_top_k_support():
    probs = np.array([0.05, 0.5, 0.3, 0.15], np.float32)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (4000, 4))
    key = jax.random.PRNGKey(0)

    def freq(**kw):
        ids = np.asarray(sample_logits(logits, key, kw.get("temperature", 1.0), kw.get("top_p", 1.0), kw.get("top_k", 0)))
        return np.bincount(ids, minlength=4) / len(ids)

    f = freq(top_p=0.7)  # keeps {1, 2}: 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert f[0] == 0 and f[3] == 0
    np.testing.assert_allclose(f[1], 0.5 / 0.8, atol=0.03)
    f = freq(top_k=3)
    assert f[0] == 0
    np.testing.assert_allclose(f[[1, 2, 3]], probs[[1, 2, 3]] / 0.95, atol=0.03)
    f = freq()
    np.testing.assert_allclose(f, probs, atol=0.03)
    f = freq(temperature=1e-3)
    assert f[1] == 1.0


def test_bucket_and_left_pad():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 1100)] == [16, 16, 32, 128, 512, 1024, 1536]
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.shape == (2, 16)
    assert tokens[0, -3:].tolist() == [5, 6, 7] and mask[0].sum() == 3 and mask[0, -3:].all()
    assert tokens[1, -1] == 8 and mask[1].sum() == 1
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Qwen2 model directory with a tokenizer from build_chat_tokenizer."""
    d = tmp_path_factory.mktemp("chat_model")
    texts = [f"The quick brown fox {i} jumps over the lazy dog. Hello world, {i * 7} times." for i in range(60)]
    tok = build_chat_tokenizer(texts, d, vocab_size=300)
    cls_name, kw = FAMILY_CASES["qwen2_tied"]
    config = getattr(transformers, cls_name)(
        **dict(kw, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


def _cli(args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "eval.generate", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("chat", [False, True])
def test_cli_generate(chat_model_dir, chat):
    prompts = ["Hello world", "The quick brown fox jumps over"]
    args = ["--checkpoint", str(chat_model_dir), "--max-new-tokens", "8"]
    for p in prompts:
        args += ["--prompt", p]
    if chat:
        args.append("--chat")
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(prompts), proc.stdout
    records = [json.loads(line) for line in lines]
    tok = transformers.AutoTokenizer.from_pretrained(chat_model_dir)
    if chat:
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        assert texts[0] == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        ids = [tok(p)["input_ids"] for p in prompts]
    model = load_hf(chat_model_dir)
    expected = generate(model.cfg, model.params, ids, 8, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    for rec, prompt, want in zip(records, prompts, expected):
        assert set(rec) == {"prompt", "completion", "completion_ids"}
        assert rec["prompt"] == prompt
        assert rec["completion_ids"] == want
        assert 1 <= len(rec["completion_ids"]) <= 8
        assert rec["completion"] == tok.decode(rec["completion_ids"], skip_special_tokens=True)


def test_cli_reports_missing_tokenizer(tiny_model_dir):
    proc = _cli(["--checkpoint", str(tiny_model_dir("qwen3")), "--prompt", "hi", "--max-new-tokens", "2"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no tokenizer" in proc.stderr


def test_prompt_past_max_position_embeddings_is_warned_about():
    from focusft_jax.evaluation.generate import context_warnings

    msgs = context_warnings([10, 60, 40], max_new_tokens=8, limit=50)
    assert len(msgs) == 1 and "prompt 1: 60 tokens" in msgs[0] and "max_position_embeddings 50" in msgs[0]
    assert context_warnings([42], 8, 50) == [] and context_warnings([43], 8, 50)  # 43 + 8 > 50
    assert context_warnings([10**6], 8, None) == []

"""The byte-level BPE chat tokenizer builder."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from focusft_jax.tokenizer import CHAT_TEMPLATE, build_chat_tokenizer

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog. Hello world, {i * 7} times." for i in range(80)] + [
    "Ünïcödé text, with dashes — and emoji 🙂",
    "def f(x):\n    return x + 1\n",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_chat_tokenizer(TEXTS, d, vocab_size=400)
    return d


def test_loads_offline_with_special_tokens(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert 259 < len(tok) <= 400
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.bos_token is None
    # Learned merges: a frequent word is a single token.
    assert len(tok(" quick", add_special_tokens=False)["input_ids"]) == 1
    # Byte-level: any text round-trips, also characters never seen in training.
    for text in ["Hello world", "ünseen ✓ text\twith\nnewlines", "漢字"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # Special tokens in text are single ids and are skipped on request.
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    user = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    convo = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "Hi."}]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
    )


def test_deterministic(tmp_path, tok_dir):
    # Same texts in another order: byte-identical files.
    build_chat_tokenizer(list(reversed(TEXTS)), tmp_path, vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_chat_tokenizer(TEXTS, tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        build_chat_tokenizer(["", ""], tmp_path)


def test_tokenizer_beside_a_qwen2_config_tokenizes_like_on_its_own(tmp_path):
    """transformers loads it as Qwen2Tokenizer next to a qwen2 config.json
    (as in our exports): the ids must not change."""
    import json

    from transformers import AutoTokenizer

    from focusft_jax.tokenizer import build_chat_tokenizer

    texts = ["Mary went to the kitchen 12 times in 2024.", "John's 345 apples weren't there!\n\n  ok"] * 30
    alone = tmp_path / "alone"
    build_chat_tokenizer(texts, alone, vocab_size=400)
    beside = tmp_path / "beside"
    build_chat_tokenizer(texts, beside, vocab_size=400)
    (beside / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    a, b = AutoTokenizer.from_pretrained(alone), AutoTokenizer.from_pretrained(beside)
    sample = "<|im_start|>user\nWhere is Mary? 12 3456 times, isn't it?\n\n  x<|im_end|>\n"
    assert a(sample)["input_ids"] == b(sample)["input_ids"]
    assert a.apply_chat_template([{"role": "user", "content": "hi 42"}], tokenize=False) == b.apply_chat_template(
        [{"role": "user", "content": "hi 42"}], tokenize=False
    )

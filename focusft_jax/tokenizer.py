"""A small byte-level BPE chat tokenizer trained from text, for tiny models.

`build_chat_tokenizer` trains a byte-level BPE (GPT-2 style pre-tokenization,
all 256 bytes in the base alphabet, so any text round-trips) with the
`tokenizers` library, wraps it as a `transformers.PreTrainedTokenizerFast`
with Qwen2.5-style special tokens and a ChatML chat template, and saves it with
`save_pretrained`, so `AutoTokenizer.from_pretrained(out_dir)` loads it
offline. The result is deterministic: the same texts and vocab size give the
same tokenizer files.

Special tokens (ids 0, 1, 2, in this order):
    <|endoftext|>  pad token
    <|im_start|>   start of a chat turn
    <|im_end|>     end of a chat turn; the eos token
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# ChatML as Qwen2.5 renders it, except that no default system message is
# inserted: a leading system message is rendered when present.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_BYTE_ALPHABET_SIZE = 256

# The Qwen2 / GPT-4-style split: contractions, letter runs, single digits,
# punctuation runs, newlines, spaces.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_chat_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    min_frequency: int = 2,
    model_max_length: int = 32768,
):
    """Trains a byte-level BPE chat tokenizer on `texts` and saves it to `out_dir`.

    texts: training text (any iterable of strings; consumed once).
    vocab_size: total vocabulary including the 3 special tokens and the 256
        byte symbols, so it must be at least 259. Fewer merges are learned
        when the texts do not support more, so the final size can be smaller;
        `len(tokenizer)` is the exact size.
    min_frequency: a pair needs this many occurrences to become a merge.
    Returns the `PreTrainedTokenizerFast` (also written to out_dir together
    with chat_template.jinja / tokenizer_config.json).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("build_chat_tokenizer needs at least one non-empty text")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Qwen2's pre-tokenization exactly: `transformers` (v5) loads a tokenizer
    # that sits beside a qwen2 config.json as Qwen2Tokenizer, which rebuilds
    # this pipeline from vocab + merges; any other split would tokenize the
    # exported model's inputs differently from training.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input: the trained merges do not depend on the order of `texts`.
    tok.train_from_iterator(sorted(texts), trainer=trainer, length=len(texts))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    _portable_config(out / "tokenizer_config.json")
    return wrapped


def _portable_config(path: Path) -> None:
    """Makes tokenizer_config.json load with transformers v4 as well as v5:
    the generic fast tokenizer class name, and the extra special tokens under
    the key both versions read."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

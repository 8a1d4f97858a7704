"""Tokenizers of the evaluated models: loading (refusing a directory without
tokenizer files), the chat-template decision and wrapping, token counts.

Named `tokenizing`, not `tokenizers`, so that running a file of this folder
as a script never shadows the `tokenizers` package.
"""
from __future__ import annotations

import os
from pathlib import Path

from focusft_jax.evaluation.errors import EvalError, check_choice

CHAT_MODES = ("auto", "on", "off")

# Files that hold a tokenizer's vocabulary (fast tokenizer.json, sentencepiece
# models, BPE / WordPiece vocabularies). A directory with none of them has no
# tokenizer: `transformers` (5.x) would then silently build an EMPTY tokenizer
# from config.json, which encodes every text to no ids.
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
TOKENIZER_HINT = (
    "A model directory needs its tokenizer files: tokenizer.json (or a vocabulary file: "
    + ", ".join(TOKENIZER_VOCAB_FILES[1:])
    + ") and tokenizer_config.json, e.g. written by focusft_jax.tokenizer.build_chat_tokenizer, "
    "by focusft_jax.hf.save_hf(..., tokenizer_dir=...) or copied from the base model."
)


def missing_tokenizer(path: str | os.PathLike) -> str | None:
    """Why the local directory `path` holds no tokenizer (a message naming the
    directory and the expected files), or None when it has a vocabulary file.
    Only local directories are checked (a hub id is checked after loading)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if any((p / f).is_file() for f in TOKENIZER_VOCAB_FILES):
        return None
    present = sorted(f.name for f in p.iterdir() if f.is_file())
    shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
    return (
        f"{p}: no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)} found; the directory has {shown}). "
        + TOKENIZER_HINT
    )


def load_tokenizer(path_or_id: str | os.PathLike):
    """A `transformers` tokenizer from a local directory, or from a hub id
    (only the tokenizer files are fetched).

    Raises EvalError with a message naming the directory and the expected
    files when the directory has no tokenizer files, when loading fails, or
    when the loaded tokenizer is empty (transformers builds one from
    config.json alone instead of failing)."""
    from transformers import AutoTokenizer

    why = missing_tokenizer(path_or_id)
    if why:
        raise EvalError(why)
    p = Path(path_or_id).expanduser()
    where = str(p) if p.is_dir() else str(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise EvalError(f"{where}: cannot load a tokenizer ({type(e).__name__}: {e}). {TOKENIZER_HINT}") from None
    if len(tok) <= 1:
        raise EvalError(f"{where}: no tokenizer (the loaded tokenizer has an empty vocabulary). {TOKENIZER_HINT}")
    return tok


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False


def use_chat_template(tokenizer, mode: str) -> bool:
    """--chat-template `mode`: auto is on when the tokenizer has a chat
    template (instruct models); on without one is an EvalError."""
    check_choice("--chat-template", mode, CHAT_MODES)
    has = has_chat_template(tokenizer)
    if mode == "auto":
        return has
    if mode == "on" and not has:
        raise EvalError("--chat-template on, but the tokenizer has no chat template")
    return mode == "on"


def chat_wrap(tokenizer, text: str) -> str:
    """`text` as one user message with the generation prompt added, as a string."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def count_tokens(tokenizer, text: str, *, add_special_tokens: bool) -> int:
    # verbose=False: counting a text longer than the tokenizer's model_max_length
    # (RULER's sizing probes do) is not an error, and is not warned about.
    return len(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def tokenizer_name(tokenizer) -> str | None:
    """What the manifest records as the tokenizer: its name or path, else its class."""
    if tokenizer is None:
        return None
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__

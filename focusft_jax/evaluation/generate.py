"""Generate completions from a Hugging Face model directory.

    python -m eval.generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...]
        [--max-new-tokens N] [--chat] [--temperature T --top-p P --top-k K --seed S]
        [--prefill-attention causal|glm_bidir] [--attention-impl auto|dense|blockwise|pallas]
        [--dtype float32|bfloat16]

All prompts run as one left-padded batch (`focusft_jax.generate`). stdout gets
exactly one JSON object per prompt, in order:

    {"prompt": TEXT, "completion": decoded text (special tokens skipped),
     "completion_ids": [ids up to and including the first EOS]}

Everything else (logs, warnings) goes to stderr. DIR is a local model
directory with tokenizer files, or a hub id (see `focusft_jax.hf.load_hf`).

--chat renders each prompt as a single user message with the tokenizer's chat
template and the generation prompt, then tokenizes the rendered text without
adding special tokens again. Without --chat the prompt is encoded with the
tokenizer's default special-token handling (e.g. a BOS where the tokenizer
adds one). Temperature 0 (the default) is greedy decoding.

EOS and padding ids follow `focusft_jax.evaluation.model_dir`: EOS from generation_config.json
(eos_token_id: an int or a list), else config.json, else the tokenizer's eos
token. The prompt forward's attention implementation is chosen by prompt
length as in the evaluation harness (`focusft_jax.evaluation.runner.prefill_attention_impl`).

A prompt whose tokens plus --max-new-tokens run past the model's
max_position_embeddings is generated anyway (the positions are computed, but
past what the model was configured for), with a warning on stderr naming the
prompt's index, its length and the limit (`context_warnings`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Sequence

from focusft_jax.evaluation.cli import add_model_options, prog_name, run_cli
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.model_dir import load_model, special_ids
from focusft_jax.evaluation.runner import encode_prompts, generate_ids
from focusft_jax.evaluation.tokenizing import chat_wrap, has_chat_template
from focusft_jax.evaluation.trained_defaults import Defaults

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("eval.generate")


def context_warnings(lengths: Sequence[int], max_new_tokens: int, limit: int | None) -> list[str]:
    """One warning per prompt (by index) whose length + max_new_tokens
    passes `limit` (max_position_embeddings; None: no limit known)."""
    if not limit:
        return []
    return [
        f"prompt {i}: {n} tokens + up to {max_new_tokens} new = {n + max_new_tokens} > the model's "
        f"max_position_embeddings {limit}; generating anyway, past the context the model was configured for"
        for i, n in enumerate(lengths)
        if n + max_new_tokens > limit
    ]


def run(
    checkpoint: str,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    prefill_attention: str = "causal",
    dtype: str | None = None,
    attention_impl: str = "auto",
) -> list[dict]:
    """Loads the checkpoint and tokenizer, generates for all prompts in one
    batch, and returns one {"prompt", "completion", "completion_ids"} dict per prompt.

    chat: each prompt as one user message with the generation prompt (the
    tokenizer's chat template), encoded without adding special tokens again.
    attention_impl: the prompt forward's attention implementation
    (`focusft_jax.evaluation.runner.prefill_attention_impl`): "auto" is blockwise
    (memory-efficient) for long prompts, dense for short ones."""
    if not prompts:
        raise EvalError("give at least one --prompt")
    if max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature == 0 and (top_p != 1.0 or top_k):
        log.warning("--top-p/--top-k have no effect with greedy decoding (--temperature 0)")

    model, tokenizer = load_model(checkpoint, dtype)
    if chat and not has_chat_template(tokenizer):
        raise EvalError("--chat needs a tokenizer with a chat template, and this one has none")
    eos, pad = special_ids(model, tokenizer)
    if not eos:
        log.warning("no eos_token_id found; every completion runs for %d tokens", max_new_tokens)
    texts = [chat_wrap(tokenizer, p) for p in prompts] if chat else list(prompts)
    ids = encode_prompts(tokenizer, texts, add_special_tokens=not chat)
    for msg in context_warnings([len(x) for x in ids], max_new_tokens, model.cfg.max_position_embeddings):
        log.warning(msg)
    log.info(
        "generating %d prompt(s), up to %d new tokens, eos %s, %s",
        len(ids), max_new_tokens, eos, "greedy" if temperature == 0 else f"temperature {temperature}",
    )
    completions = generate_ids(
        model, ids, max_new_tokens, eos=eos, pad=pad, prefill_attention=prefill_attention,
        attention_impl=attention_impl, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
    )
    return [
        {
            "prompt": text,
            "completion": tokenizer.decode(out, skip_special_tokens=True),
            "completion_ids": out,
        }
        for text, out in zip(prompts, completions)
    ]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog_name("eval.generate", "focusft-generate"),
        description="Generate completions; prints one JSON object per prompt on stdout.",
    )
    add_model_options(ap, checkpoint_required=True)
    ap.add_argument(
        "--prompt", dest="prompts", metavar="TEXT", action="append", required=True, help="a prompt; repeat for a batch"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt as a user message (chat template); default on for a model trained here "
        "(its focusft.json), else off",
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
    return ap.parse_args(argv)


def _emit(args: argparse.Namespace) -> int:
    """Generates, then writes the JSON lines; the exit status. The options'
    names are `run`'s parameters."""
    defaults = Defaults(args.checkpoint)  # choices and warnings go to stderr
    args.prefill_attention = defaults.prefill_attention(args.prefill_attention)
    args.chat = defaults.chat(args.chat)
    # Libraries sometimes print to stdout; keep stdout for the JSON lines only.
    with contextlib.redirect_stdout(sys.stderr):
        results = run(**vars(args))
    for r in results:
        sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    return run_cli(lambda: _emit(args))


if __name__ == "__main__":
    sys.exit(main())

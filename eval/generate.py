"""Generate completions from a Hugging Face model directory.

    python -m eval.generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...]
        [--max-new-tokens N] [--chat] [--temperature T --top-p P --top-k K --seed S]
        [--prefill-attention causal|glm_bidir] [--attention-impl auto|dense|blockwise]
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

EOS ids come from generation_config.json (eos_token_id: an int or a list),
else config.json, else the tokenizer's eos token.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("eval.generate")


class GenerateError(RuntimeError):
    """A problem with the inputs that the user can fix; the message says how."""


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def eos_ids_for(model_dir: Path, hf_config: dict, tokenizer) -> list[int]:
    """EOS ids: generation_config.json, else config.json, else the tokenizer."""
    gen = _read_json(Path(model_dir) / "generation_config.json")
    for source in (gen, hf_config):
        ids = _as_id_list(source.get("eos_token_id"))
        if ids:
            return ids
    return _as_id_list(getattr(tokenizer, "eos_token_id", None))


def pad_id_for(model_dir: Path, hf_config: dict, tokenizer, eos: Sequence[int]) -> int:
    """Padding id: the tokenizer's pad token, else the configs', else the first EOS, else 0."""
    gen = _read_json(Path(model_dir) / "generation_config.json")
    candidates = [getattr(tokenizer, "pad_token_id", None), gen.get("pad_token_id"), hf_config.get("pad_token_id")]
    for c in candidates:
        ids = _as_id_list(c)
        if ids:
            return ids[0]
    return int(eos[0]) if eos else 0


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in model_dir; GenerateError when there is none
    (no tokenizer files, unreadable, or empty: transformers would otherwise
    build an empty tokenizer from config.json). The check is shared with the
    evaluation harness: `eval.report.load_tokenizer`."""
    from eval.report import load_tokenizer as _load

    return _load(Path(model_dir), error=GenerateError)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt; with `chat`, as one user message plus the generation prompt."""
    encoded = []
    for i, text in enumerate(prompts):
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise GenerateError("--chat needs a tokenizer with a chat template, and this one has none")
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise GenerateError(f"prompt {i} ({text!r}) encodes to no tokens")
        encoded.append([int(t) for t in ids])
    return encoded


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

    attention_impl: the prompt forward's attention implementation, as in the
    evaluation harness (`eval.report.prefill_attention_impl`): "auto" is
    blockwise (memory-efficient) for long prompts, dense for short ones."""
    from eval.report import EvalError, prefill_attention_impl
    from focusft_jax.generate import bucket_length, generate
    from focusft_jax.hf import load_hf, resolve_model_dir

    if not prompts:
        raise GenerateError("give at least one --prompt")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerateError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature == 0 and (top_p != 1.0 or top_k):
        log.warning("--top-p/--top-k have no effect with greedy decoding (--temperature 0)")

    model_dir = resolve_model_dir(checkpoint)
    tokenizer = load_tokenizer(model_dir)
    overrides = {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}
    model = load_hf(model_dir, **overrides)
    eos = eos_ids_for(model_dir, model.hf_config, tokenizer)
    if not eos:
        log.warning("no eos_token_id found; every completion runs for %d tokens", max_new_tokens)
    pad = pad_id_for(model_dir, model.hf_config, tokenizer, eos)
    ids = encode_prompts(tokenizer, prompts, chat)
    too_big = [t for p in ids for t in p if t >= model.cfg.vocab_size]
    if too_big:
        raise GenerateError(
            f"the tokenizer produced id {max(too_big)}, outside the model's vocabulary ({model.cfg.vocab_size}); "
            "the tokenizer does not belong to this model"
        )
    log.info(
        "generating %d prompt(s), up to %d new tokens, eos %s, %s",
        len(ids), max_new_tokens, eos, "greedy" if temperature == 0 else f"temperature {temperature}",
    )
    try:
        impl = prefill_attention_impl(bucket_length(max(len(p) for p in ids)), attention_impl)
    except EvalError as e:
        raise GenerateError(str(e)) from None
    completions = generate(
        model.cfg.replace(attention_impl=impl),
        model.params,
        ids,
        max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        prefill_attention=prefill_attention,
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
        prog="python -m eval.generate",
        description="Generate completions; prints one JSON object per prompt on stdout.",
    )
    ap.add_argument("--checkpoint", required=True, help="Hugging Face model directory (or hub id)")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-attention", choices=("causal", "glm_bidir"), default="causal")
    ap.add_argument(
        "--attention-impl",
        choices=("auto", "dense", "blockwise"),
        default="auto",
        help="attention implementation of the prompt forward: auto (default) = blockwise for long prompts",
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from focusft_jax.hf import CheckpointError

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        # Libraries sometimes print to stdout; keep stdout for the JSON lines only.
        with contextlib.redirect_stdout(sys.stderr):
            results = run(
                args.checkpoint,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                chat=args.chat,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                prefill_attention=args.prefill_attention,
                dtype=args.dtype,
                attention_impl=args.attention_impl,
            )
    except (GenerateError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation for the evaluation tools.

* the prefill's attention implementation, chosen by prompt length
  (`prefill_attention_impl`: blockwise, memory-efficient, for long prompts)
  and what the manifest records of it (`attention_impl_record`);
* `generate_ids`: one batch of token-id prompts through
  `focusft_jax.generate.generate` (every tool's path to the model);
* `make_generate_fn`: the greedy `generate_fn(prompts: list[str]) -> list[str]`
  of a checkpoint. It gets fully formatted prompt strings (chat template
  already applied) and returns the continuations as text;
* `run_generation`: any generate_fn over prompts sorted by length, batched,
  a progress bar on stderr, outputs back in the caller's order.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from focusft_jax.evaluation.errors import EvalError, check_choice
from focusft_jax.attention import ATTENTION_IMPLS as LIBRARY_ATTENTION_IMPLS
from focusft_jax.generate import PREFILL_ATTENTIONS
from focusft_jax.evaluation.model_dir import load_model, special_ids

GenerateFn = Callable[[list[str]], list[str]]

# The library's own choices; "auto" here picks an implementation by prompt
# length (the library's own "auto", by backend, is not offered separately).
ATTENTION_IMPLS = ("auto", *(name for name in LIBRARY_ATTENTION_IMPLS if name != "auto"))
# --attention-impl auto: the prompt forward (prefill) uses blockwise
# (memory-efficient) attention from this many padded prompt tokens on, dense
# below. Dense attention builds float32 scores of [heads, P, P + new tokens]
# per layer: 0.5 GB per 28 heads at 2K, 30 GB at 16K, 2 TB at 128K.
BLOCKWISE_FROM_TOKENS = 2048


# ---------------------------------------------------------------- prefill attention


def prefill_attention_impl(padded_prompt_tokens: int, attention_impl: str = "auto") -> str:
    """The attention implementation (ModelConfig.attention_impl) for a prefill
    of `padded_prompt_tokens` tokens: "auto" is blockwise from
    BLOCKWISE_FROM_TOKENS on and dense below; "dense" / "blockwise" as named.
    Both compute exact attention; blockwise never builds the P x P scores."""
    check_choice("--attention-impl", attention_impl, ATTENTION_IMPLS)
    if attention_impl != "auto":
        return attention_impl
    return "blockwise" if padded_prompt_tokens >= BLOCKWISE_FROM_TOKENS else "dense"


def attention_impl_record(attention_impl: str = "auto") -> dict:
    """What the manifest records about the attention implementation."""
    check_choice("--attention-impl", attention_impl, ATTENTION_IMPLS)
    return {
        "setting": attention_impl,
        "prefill": (
            f"blockwise from {BLOCKWISE_FROM_TOKENS} padded prompt tokens, dense below"
            if attention_impl == "auto"
            else attention_impl
        ),
        "decode": "dense (one query row per step)",
        "note": "both implementations compute exact attention",
    }


# ---------------------------------------------------------------- the model


def encode_prompts(tokenizer, prompts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each prompt string, as the model is fed them: with
    `add_special_tokens` for plain prompts (e.g. a BOS where the tokenizer
    adds one, as `transformers` does), without when a chat template already
    wrote the special tokens. EvalError for a prompt that encodes to no ids."""
    encoded = []
    for i, text in enumerate(prompts):
        ids = [int(t) for t in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]
        if not ids:
            raise EvalError(f"prompt {i} ({text[:80]!r}) encodes to no tokens; the tokenizer is empty or broken")
        encoded.append(ids)
    return encoded


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos: Sequence[int],
    pad: int,
    prefill_attention: str = "causal",
    attention_impl: str = "auto",
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """Completion ids (up to and including the first EOS) of one left-padded
    batch of token-id prompts, by `focusft_jax.generate.generate` on `model`
    (a focusft_jax HFModel). The model's config is overridden with the
    prefill's attention implementation for the batch's padded prompt length
    (`bucket_length` of the longest prompt, the padding `generate` applies);
    decode steps are dense either way. temperature 0 is greedy.

    EvalError when an id is outside the model's vocabulary (the tokenizer
    does not belong to the model)."""
    import focusft_jax.generate as gen  # jax only when a model runs; looked up per call

    check_choice("--prefill-attention", prefill_attention, PREFILL_ATTENTIONS)
    vocab = model.cfg.vocab_size
    top = max(max(p) for p in prompts)
    if top >= vocab:
        raise EvalError(
            f"the tokenizer produced id {top}, outside the model's vocabulary ({vocab}); "
            "the tokenizer does not belong to this model"
        )
    impl = prefill_attention_impl(gen.bucket_length(max(len(p) for p in prompts)), attention_impl)
    return gen.generate(
        model.cfg.replace(attention_impl=impl),
        model.params,
        prompts,
        max_new_tokens,
        eos_ids=list(eos),
        pad_id=pad,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        prefill_attention=prefill_attention,
    )


def make_generate_fn(
    checkpoint: str | os.PathLike,
    batch_size: int,
    prefill_attention: str = "causal",
    max_new_tokens: int = 20,
    *,
    add_special_tokens: bool = True,
    attention_impl: str = "auto",
) -> GenerateFn:
    """Greedy `generate_fn(prompts) -> continuations` for a checkpoint.

    Prompts are strings as the model must see them (chat template already
    applied); they are tokenized with `add_special_tokens` (True for plain
    prompts of base models; False when a chat template already wrote the
    special tokens) and run `batch_size` at a time through `generate_ids`.
    Continuations are decoded with special tokens skipped.

    attention_impl: the attention implementation of the prompt forward
    (`prefill_attention_impl`): "auto" (default) is dense for short prompts
    and blockwise (memory-efficient, never builds P x P scores) from
    BLOCKWISE_FROM_TOKENS padded prompt tokens on, per batch.

    The model is loaded once per checkpoint (`focusft_jax.evaluation.model_dir.load_model`),
    so asking again for another `max_new_tokens` is cheap. EOS and padding
    ids follow `focusft_jax.evaluation.model_dir`'s precedence.
    """
    check_choice("--prefill-attention", prefill_attention, PREFILL_ATTENTIONS)
    check_choice("--attention-impl", attention_impl, ATTENTION_IMPLS)
    model, tok = load_model(checkpoint)
    eos, pad = special_ids(model, tok)

    def generate_fn(prompts: list[str]) -> list[str]:
        outs: list[str] = []
        for i in range(0, len(prompts), batch_size):
            ids = encode_prompts(tok, prompts[i : i + batch_size], add_special_tokens=add_special_tokens)
            new = generate_ids(
                model, ids, max_new_tokens, eos=eos, pad=pad,
                prefill_attention=prefill_attention, attention_impl=attention_impl,
            )
            outs.extend(tok.decode(n, skip_special_tokens=True) for n in new)
        return outs

    return generate_fn


# ---------------------------------------------------------------- the runner


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, longest first
    (similar lengths share a batch, so little padding; the longest batch runs
    first, so an out-of-memory error shows at once). Ties keep input order."""
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_generation(
    prompts: Sequence[str],
    generate_fn: GenerateFn,
    *,
    batch_size: int = 1,
    lengths: Sequence[int] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Runs `generate_fn` over `prompts` in length-sorted batches (lengths:
    e.g. token counts; default the character counts) with a tqdm bar on
    stderr. Returns one continuation per prompt, in the order of `prompts`."""
    prompts = list(prompts)
    if lengths is None:
        lengths = [len(p) for p in prompts]
    if len(lengths) != len(prompts):
        raise EvalError(f"{len(lengths)} lengths for {len(prompts)} prompts")
    outputs: list[str | None] = [None] * len(prompts)
    bar = None
    if progress and prompts:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in length_sorted_batches(lengths, batch_size):
            got = list(generate_fn([prompts[i] for i in batch]))
            if len(got) != len(batch):
                raise EvalError(f"generate_fn returned {len(got)} outputs for {len(batch)} prompts")
            for i, text in zip(batch, got):
                if not isinstance(text, str):
                    raise EvalError(f"generate_fn must return strings, got {type(text).__name__}")
                outputs[i] = text
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return outputs  # type: ignore[return-value]

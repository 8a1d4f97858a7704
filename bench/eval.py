"""Evaluation throughput: prompt tokens/s and samples/s of the eval harness's
generation path at long prompt lengths, dense vs blockwise prefill attention.

Builds a small random Qwen2-architecture model directory (a byte-level BPE chat
tokenizer from `build_chat_tokenizer`, random weights written by `save_hf`),
or uses --checkpoint DIR. For each length it makes RULER samples (default
niah_single_1, plain prompts) fitted to the length with the model's tokenizer,
exactly as `python -m eval.ruler` does, and runs them through
`focusft_jax.evaluation.runner.run_generation` with `focusft_jax.evaluation.runner.make_generate_fn` (the code
path of both eval CLIs) for each prefill attention implementation
(`--attention-impl dense|blockwise`; ModelConfig.attention_impl of the prompt
forward; decode steps are dense either way).

Per (length, implementation) it reports:
  total_s, samples_per_s, prompt_tokens_per_s   the whole run (tokenization,
                                                 prefill, decode, detokenization)
  prefill_s, prefill_tokens_per_s               the same samples with
                                                 max_new_tokens=1 (prompt forward
                                                 + one token)
  decode_s, decode_tokens_per_s                 total - prefill, over the
                                                 (tokens_to_generate - 1) tokens
                                                 of every sample
  compile_s                                     first (untimed) run minus a timed run
  xla_temp_bytes                                XLA's temporary buffers of the
                                                 compiled generation program of
                                                 one batch (dense grows with P^2,
                                                 blockwise with P)
The random model never emits EOS (the lm_head column of the EOS id is zero,
so its logit 0 is below the maximum of the others), so every sample decodes
exactly tokens_to_generate tokens. Dense runs whose attention scores
(float32 [B, heads, P, P + N] per layer) would exceed --dense-max-gb are
skipped and say so. Times are the best of --repeats runs (a shared host only
adds time). Prints one JSON document.

    python bench/eval.py                                   # CPU: 2K, 8K, 16K
    python bench/eval.py --lengths 16384,32768,65536,131072 --batch-size 1 \\
        --layers 8 --hidden 1024 --dense-max-gb 40         # an accelerator
    python bench/eval.py --checkpoint DIR --lengths 32768  # a real model
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _texts():
    import random

    from focusft_jax.evaluation import wordlists
    from focusft_jax.evaluation.manifest import load_benchmark
    from focusft_jax.data.babi import filler_sentences

    rng = random.Random(0)
    texts = [json.dumps(load_benchmark("ruler")), json.dumps(load_benchmark("babilong"))]
    texts += list(filler_sentences(0, 2000))
    texts += [" ".join(wordlists.nouns()), " ".join(wordlists.adjectives())]
    texts += [" ".join(str(rng.randint(10**6, 10**7 - 1)) for _ in range(50)) for _ in range(20)]
    return texts


def build_model_dir(out: Path, layers: int, hidden: int, vocab: int, heads: int, kv_heads: int, max_len: int) -> Path:
    """A random Qwen2 model directory with a chat tokenizer; EOS is never the argmax."""
    import jax

    from focusft_jax.hf import save_hf
    from focusft_jax.model import ModelConfig, init_params
    from focusft_jax.tokenizer import build_chat_tokenizer

    tok = build_chat_tokenizer(_texts(), out / "tok", vocab_size=vocab)
    cfg = ModelConfig(
        family="qwen2",
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        qkv_bias=True,
        tie_word_embeddings=False,
        max_position_embeddings=max_len,
        rope_theta=1e6,
    )
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.05)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, tok.eos_token_id].set(0.0)
    ids = {"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return save_hf(out / "model", cfg, params, hf_config=ids, tokenizer_dir=out / "tok")


def _runner(model_dir, prompts, budgets, batch_size, max_new, add_special, impl):
    """A no-argument function running the prompts through the eval harness."""
    from focusft_jax.evaluation.runner import make_generate_fn, run_generation

    fn = make_generate_fn(model_dir, batch_size, "causal", max_new, add_special_tokens=add_special, attention_impl=impl)
    return lambda: run_generation(prompts, fn, batch_size=batch_size, lengths=budgets, progress=False)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def xla_temp_bytes(model_dir, prompts, batch: int, max_new: int, impl: str, add_special_tokens: bool) -> int | None:
    """Temporary buffer bytes of the compiled generation program of the first
    (longest) batch, as the eval path would run it."""
    import jax
    import jax.numpy as jnp

    import focusft_jax.generate as gen
    from focusft_jax.evaluation.model_dir import load_model, special_ids
    from focusft_jax.evaluation.runner import encode_prompts

    model, tok = load_model(model_dir)
    ids = encode_prompts(tok, prompts[:batch], add_special_tokens=add_special_tokens)
    tokens, mask = gen.left_pad(ids, special_ids(model, tok)[1])
    cfg = model.cfg.replace(attention_impl=impl)
    lowered = gen._generate_jit.lower(
        cfg, model.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray([2], jnp.int32), jnp.asarray(0, jnp.int32),
        jax.random.PRNGKey(0), jnp.float32(1), jnp.float32(1), jnp.int32(0),
        max_new_tokens=max_new, sample=False, prefill_attention="causal",
    )  # fmt: skip
    mem = lowered.compile().memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,8192,16384", help="comma-separated prompt budgets in tokens")
    ap.add_argument("--impls", default="dense,blockwise", help="prefill attention implementations to compare")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None, help="samples per length (default: one batch)")
    ap.add_argument("--task", default="niah_single_1", help="RULER task whose prompts are used")
    ap.add_argument("--chat", action="store_true", help="prompts in the chat template (default plain)")
    ap.add_argument("--checkpoint", default=None, help="a model directory instead of the random model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense runs whose scores exceed this")
    ap.add_argument("--no-memory", action="store_true", help="skip the XLA memory analysis (one compile each)")
    args = ap.parse_args(argv)

    import jax

    from focusft_jax.evaluation import ruler_data as rd
    from focusft_jax.evaluation.model_dir import load_model
    from focusft_jax.evaluation.runner import BLOCKWISE_FROM_TOKENS, prefill_attention_impl
    from focusft_jax.generate import bucket_length

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    n_samples = args.samples or args.batch_size
    ttg = rd.tokens_to_generate(args.task)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if args.checkpoint:
            model_dir = Path(args.checkpoint)
        else:
            model_dir = build_model_dir(
                Path(tmp), args.layers, args.hidden, args.vocab, args.heads, args.kv_heads, max(lengths) + 1024
            )
        model, tok = load_model(model_dir)
        cfg = model.cfg
        setup_s = time.perf_counter() - t
        fmt = rd.Formatter(tok, args.chat)
        results = []
        for length in lengths:
            t = time.perf_counter()
            rows = rd.generate_samples(args.task, length, n_samples, fmt, seed=42)
            samples_s = time.perf_counter() - t
            prompts = [r["input"] + r["answer_prefix"] for r in rows]
            prompt_tokens = [r["prompt_tokens"] for r in rows]
            budgets = [r["length"] for r in rows]
            padded = bucket_length(max(prompt_tokens))
            for impl in impls:
                rec = {
                    "length": length,
                    "impl": impl,
                    "auto_would_use": prefill_attention_impl(padded, "auto"),
                    "batch_size": args.batch_size,
                    "samples": n_samples,
                    "mean_prompt_tokens": round(sum(prompt_tokens) / n_samples, 1),
                    "padded_prompt_tokens": padded,
                    "new_tokens_per_sample": ttg,
                    "sample_generation_s": round(samples_s, 2),
                }
                score_gb = args.batch_size * cfg.num_heads * padded * (padded + ttg) * 4 / 1e9
                if impl == "dense" and score_gb > args.dense_max_gb:
                    rec["skipped"] = f"dense scores need {score_gb:.1f} GB per layer > --dense-max-gb {args.dense_max_gb}"
                    results.append(rec)
                    print(json.dumps(rec), file=sys.stderr)
                    continue
                add_special = not args.chat

                full = _runner(model_dir, prompts, budgets, args.batch_size, ttg, add_special, impl)
                prefill = _runner(model_dir, prompts, budgets, args.batch_size, 1, add_special, impl)
                t = time.perf_counter()
                full()
                first_full = time.perf_counter() - t
                t = time.perf_counter()
                prefill()
                first_prefill = time.perf_counter() - t
                total_s = _best(full, args.repeats)
                prefill_s = _best(prefill, args.repeats)
                decode_s = max(total_s - prefill_s, 1e-9)
                n_prompt = sum(prompt_tokens)
                rec.update(
                    total_s=round(total_s, 3),
                    samples_per_s=round(n_samples / total_s, 4),
                    prompt_tokens_per_s=round(n_prompt / total_s, 1),
                    prefill_s=round(prefill_s, 3),
                    prefill_tokens_per_s=round(n_prompt / prefill_s, 1),
                    decode_s=round(decode_s, 3),
                    decode_tokens_per_s=round(n_samples * (ttg - 1) / decode_s, 1),
                    prefill_share=round(prefill_s / total_s, 3),
                    compile_s=round(max(first_full - total_s, 0) + max(first_prefill - prefill_s, 0), 2),
                    dense_scores_gb_per_layer=round(score_gb, 3),
                )
                if not args.no_memory:
                    rec["xla_temp_bytes"] = xla_temp_bytes(model_dir, prompts, args.batch_size, ttg, impl, add_special)
                results.append(rec)
                print(json.dumps(rec), file=sys.stderr)
    out = {
        "model": (
            str(args.checkpoint)
            if args.checkpoint
            else f"Qwen2 random, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}"
        ),
        "task": args.task,
        "chat_template": args.chat,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "auto_blockwise_from_tokens": BLOCKWISE_FROM_TOKENS,
        "setup_s": round(setup_s, 2),
        "results": results,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

"""Decode throughput of focusft_jax.generate against transformers on the same CPU.

Builds a small random Qwen2-architecture model with `transformers` in a temp
directory, imports it with `focusft_jax.hf.load_hf`, and generates 128 new
tokens greedily for a batch of 8 left-padded prompts of different lengths with
both implementations. Both produce exactly 128 tokens: ours gets no EOS ids,
transformers gets `min_new_tokens=128`. Each side is warmed up first (jit
compile, torch first-call overhead), then both are timed alternately over
`--repeats` runs each and the best time of each side is kept. Prints one
JSON object on stdout:

    {"ours_tokens_per_s": ..., "transformers_tokens_per_s": ...,
     "ratio": ours / transformers, ...}

where tokens/s counts new tokens of the whole batch (8 * 128 per run) and a
timed run includes the prefill. torch uses its default thread count; when
other processes load the cores its threads slow down far more than XLA's, so
transformers is also timed with one torch thread ("ratio_vs_1thread"), the
figure to trust on a busy machine.

Usage: python bench/generate.py [--repeats N] [--no-torch-1-thread]
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--torch-1-thread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time transformers with torch.set_num_threads(1) (robust when other processes load the cores)",
    )
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import transformers

    from focusft_jax.generate import generate_tokens, left_pad
    from focusft_jax.hf import load_hf

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(12, 33, size=args.batch)]
    prompts = [rng.integers(3, args.vocab, size=n).tolist() for n in lengths]
    n_new = args.new_tokens
    total_new = args.batch * n_new

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
        hf_model.save_pretrained(tmp)
        ours = load_hf(tmp)

    # ---- ours
    tokens, mask = left_pad(prompts, pad_id=0)
    tokens, mask = jax.numpy.asarray(tokens), jax.numpy.asarray(mask)
    no_eos = jax.numpy.zeros((0,), jax.numpy.int32)

    def run_ours():
        out = generate_tokens(ours.cfg, ours.params, tokens, mask, no_eos, 0, max_new_tokens=n_new)
        return jax.block_until_ready(out)

    t = time.perf_counter()
    res = run_ours()
    compile_s = time.perf_counter() - t
    assert int(res.steps) == n_new and bool(np.all(np.asarray(res.lengths) == n_new))

    # ---- transformers
    p = max(lengths)
    ids = torch.zeros((args.batch, p), dtype=torch.long)
    am = torch.zeros((args.batch, p), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):] = torch.tensor(row)
        am[i, p - len(row):] = 1

    def run_hf():
        with torch.inference_mode():
            return hf_model.generate(
                input_ids=ids,
                attention_mask=am,
                do_sample=False,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                eos_token_id=2,
                pad_token_id=0,
            )

    hf_out = run_hf()  # warm-up
    assert hf_out.shape[1] - p == n_new, hf_out.shape

    # Interleaved timing, so that load from other processes hits both sides alike.
    ours_times, hf_times = [], []
    for _ in range(args.repeats):
        ours_times.append(_timed(run_ours))
        hf_times.append(_timed(run_hf))
    ours_s, hf_s = min(ours_times), min(hf_times)
    hf1_s = None
    if args.torch_1_thread:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_hf()
            hf1_s = min(_timed(run_hf) for _ in range(args.repeats))
        finally:
            torch.set_num_threads(threads)

    ours_tokens = np.asarray(res.tokens)
    hf_tokens = hf_out[:, p:].numpy()
    result = {
        "batch": args.batch,
        "new_tokens": n_new,
        "model": f"Qwen2 random, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}",
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
        "ours_compile_s": round(compile_s, 3),
        "ours_s": round(ours_s, 4),
        "transformers_s": round(hf_s, 4),
        "ours_tokens_per_s": round(total_new / ours_s, 1),
        "transformers_tokens_per_s": round(total_new / hf_s, 1),
        "ratio": round(hf_s / ours_s, 2),
        "ours_median_s": round(float(np.median(ours_times)), 4),
        "transformers_median_s": round(float(np.median(hf_times)), 4),
        # Greedy argmax ties differ between backends late in a long random
        # sequence; the fraction of identical tokens is informative only.
        "transformers_1thread_tokens_per_s": None if hf1_s is None else round(total_new / hf1_s, 1),
        "ratio_vs_1thread": None if hf1_s is None else round(hf1_s / ours_s, 2),
        "token_agreement": round(float(np.mean(ours_tokens == hf_tokens)), 4),
    }
    print(json.dumps(result))
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

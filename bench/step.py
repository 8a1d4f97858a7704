"""Training-step cost of SFT and FocuSFT, side by side in one run.

For SFT (causal), SFT (glm_bidir), FocuSFT first_order and FocuSFT full, at
two sequence lengths (the second twice the first), on a small random
Qwen2-architecture model: XLA FLOPs (cost analysis), XLA temporary bytes
(memory analysis) and median wall seconds of a jitted value_and_grad step.
The last tenth of each sequence is the response (loss tokens), the rest one
context turn. Prints one JSON object.

    python bench/step.py [--seq 1024] [--layers 8] [--hidden 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from focusft_jax.bilevel import FocusConfig, focusft_loss  # noqa: E402
from focusft_jax.model import ModelConfig, init_params  # noqa: E402

VARIANTS = {
    "sft_causal": dict(num_inner_steps=0, attention="causal"),
    "sft_glm_bidir": dict(num_inner_steps=0, attention="glm_bidir"),
    "focusft_first_order": dict(meta_gradient="first_order"),
    "focusft_full": dict(meta_gradient="full"),
}


def make_batch(batch: int, seq: int, vocab: int) -> dict:
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, vocab)
    resp = max(1, seq // 10)
    loss_mask = jnp.zeros((batch, seq), jnp.int32).at[:, seq - resp :].set(1)
    return {"input_ids": ids, "attention_mask": jnp.ones((batch, seq), jnp.int32), "loss_mask": loss_mask}


def measure(cfg: ModelConfig, fcfg: FocusConfig, params, batch, repeats: int) -> dict:
    step = jax.jit(jax.value_and_grad(focusft_loss, has_aux=True), static_argnums=(3, 4))
    rng = jax.random.key(1)
    compiled = step.lower(params, batch, rng, cfg, fcfg).compile()
    # Cost analysis counts a loop body once: count FLOPs on the unrolled program.
    unrolled = cfg.replace(scan_layers=False)
    cost = step.lower(params, batch, rng, unrolled, fcfg).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, batch, rng))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, batch, rng))
        times.append(time.perf_counter() - t0)
    return {
        "flops": float(cost.get("flops", 0.0)),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "median_step_s": statistics.median(times),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024, help="shorter length; the second is twice it")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--attention-impl", default="blockwise")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = ModelConfig(
        family="qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_layers=args.layers,
        num_heads=max(args.hidden // 64, 1),
        num_kv_heads=max(args.hidden // 256, 1),
        head_dim=64,
        qkv_bias=True,
        attention_impl=args.attention_impl,
    )
    params = init_params(cfg, jax.random.key(0))
    lengths = [args.seq, 2 * args.seq]
    results: dict = {"config": {**vars(args), "lengths": lengths, "backend": jax.default_backend()}, "variants": {}}
    for seq in lengths:
        batch = make_batch(args.batch, seq, cfg.vocab_size)
        for name, kw in VARIANTS.items():
            fcfg = FocusConfig(max_loss_positions=max(1, seq // 10), **kw)
            results["variants"].setdefault(name, {})[str(seq)] = measure(cfg, fcfg, params, batch, args.repeats)
    v = results["variants"]
    short, long = str(lengths[0]), str(lengths[1])
    ratios = {}
    for seq in (short, long):
        base = v["sft_causal"][seq]
        for name in ("sft_glm_bidir", "focusft_first_order", "focusft_full"):
            for key in ("flops", "temp_bytes", "median_step_s"):
                ratios[f"{name}/sft_causal {key} @{seq}"] = v[name][seq][key] / base[key]
    for name in VARIANTS:
        ratios[f"{name} temp_bytes {long}/{short}"] = v[name][long]["temp_bytes"] / v[name][short]["temp_bytes"]
    results["ratios"] = ratios
    results["targets"] = {
        "first_order flops <= 1.6x sft": all(
            ratios[f"focusft_first_order/sft_causal flops @{s}"] <= 1.6 for s in (short, long)
        ),
        "first_order temp memory <= 1.2x sft": all(
            ratios[f"focusft_first_order/sft_causal temp_bytes @{s}"] <= 1.2 for s in (short, long)
        ),
        "focusft memory growth 2x length <= 2.3x": ratios[f"focusft_first_order temp_bytes {long}/{short}"] <= 2.3,
    }
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Training-step cost of SFT and FocuSFT, side by side in one run, and
against a `transformers` PyTorch step on the same model and batch.

One small random Qwen2-architecture model is built in PyTorch
(`transformers.Qwen2Config` / `AutoModelForCausalLM.from_config`), saved and
imported with `focusft_jax.hf.load_hf`, so both frameworks hold identical
weights. In every batch (`--batch` rows, 1 by default) the last tenth of the
tokens is the response (the loss tokens) and the rest one context turn.

cost: for SFT (causal), SFT (glm_bidir), FocuSFT first_order and FocuSFT
    full, at `--seq` and twice that: FLOPs counted analytically
    (`focusft_jax.flops`: `step_flops` of the step, `forward_flops` of one
    forward with the variant's mask as the fused step runs it, the last layer
    and the LM head at the scored positions only, on the exact workload of
    the batch: its attention ranges and its scored positions; XLA's cost analysis counts
    a loop body once, so it cannot count scanned layers or the blockwise
    attention's loops), XLA temporary bytes (memory analysis of the program
    that training runs, layers scanned) and median wall seconds of the jitted
    `value_and_grad(focusft_loss)` step. The batch carries its P scored
    positions (`loss.scored_positions`, P = the response length) as training's
    loader batches do.
vs_torch: at each of `--torch-lengths` (1K, 4K and 8K tokens by default),
    median wall seconds of one PyTorch forward + `loss.backward()` (default
    SDPA attention with its causal mask; cross-entropy on the response
    tokens, with logits only where the loss needs them, as ours) and of our
    SFT (causal), SFT (glm_bidir) and FocuSFT first_order steps. The steps
    run interleaved, round-robin (each round starting one step further), so
    that a change of machine load hits all of them alike, and the PyTorch and our SFT losses are compared (same
    model, same batch, same loss). `--torch-hf-labels` also times
    transformers' own `model(input_ids, labels=...)` loss (logits at every
    position).

Prints one JSON object: per-variant numbers, the ratios side by side, and
which targets hold. On a shared machine only the ratios mean something (the
load average is recorded); PyTorch's OpenMP threads in particular slow down
badly when another process competes for the cores.

    python bench/step.py [--seq 1024] [--torch-lengths 1024,4096,8192]
                         [--layers 8] [--hidden 256] [--repeats 3]
                         [--variants sft_causal,sft_glm_bidir,focusft_first_order]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from focusft_jax.attention import attention_meta  # noqa: E402
from focusft_jax.bilevel import FocusConfig, focusft_loss  # noqa: E402
from focusft_jax.flops import forward_flops, step_flops, workload_from_meta  # noqa: E402
from focusft_jax.hf import config_from_hf, load_hf  # noqa: E402
from focusft_jax.loss import scored_positions  # noqa: E402
from focusft_jax.model import ModelConfig, init_params  # noqa: E402

VARIANTS = {
    "sft_causal": dict(num_inner_steps=0, attention="causal"),
    "sft_glm_bidir": dict(num_inner_steps=0, attention="glm_bidir"),
    "focusft_first_order": dict(meta_gradient="first_order"),
    "focusft_full": dict(meta_gradient="full"),
}
# Ours in the PyTorch comparison (FocuSFT full is second order, not the default).
TORCH_VARIANTS = ("sft_causal", "sft_glm_bidir", "focusft_first_order")


def make_batch(batch: int, seq: int, vocab: int) -> dict:
    """The last tenth of every row is the response; with the batch's scored
    positions as the loader emits them (P = the response length: the logits,
    and in the fused form the last layer, at those positions only)."""
    ids = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq), 0, vocab), np.int32)
    resp = max(1, seq // 10)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq - resp :] = 1
    arrays = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int32), "loss_mask": loss_mask}
    arrays.update(scored_positions(arrays, resp))
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def focus_config(name: str) -> FocusConfig:
    return FocusConfig(**VARIANTS[name])


def analytic_flops(cfg: ModelConfig, fcfg: FocusConfig, batch: dict) -> dict:
    """Model FLOPs (focusft_jax.flops) of the step and of one forward, on the
    exact workload of `batch` under the variant's mask."""
    meta = attention_meta(batch["attention_mask"], batch["loss_mask"], kind=fcfg.attention)
    work = workload_from_meta(np.asarray(meta.kv_start), np.asarray(meta.kv_end), np.asarray(batch["loss_index"]))
    return {"flops": step_flops(cfg, fcfg, work)["total"], "forward_flops": forward_flops(cfg, work)}


def jitted_step():
    return jax.jit(jax.value_and_grad(focusft_loss, has_aux=True), static_argnums=(3, 4))


def measure(cfg: ModelConfig, fcfg: FocusConfig, params, batch, repeats: int) -> dict:
    step = jitted_step()
    rng = jax.random.key(1)
    compiled = step.lower(params, batch, rng, cfg, fcfg).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, batch, rng))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, batch, rng))
        times.append(time.perf_counter() - t0)
    return {
        **analytic_flops(cfg, fcfg, batch),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "median_step_s": statistics.median(times),
    }


# ---------------------------------------------------------------- one model, both frameworks


def hf_config_kwargs(args, max_len: int) -> dict:
    """The Qwen2 config of the benchmark model: head_dim 64, FFN 3x hidden,
    4 query heads per KV head (the shapes this bench always used)."""
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 256, 1),
        head_dim=64,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


def build_models(args, max_len: int):
    """(torch model or None, ModelConfig, params): the PyTorch model, saved and
    imported with load_hf (identical weights); without a PyTorch comparison,
    random JAX weights of the same architecture."""
    overrides = dict(attention_impl=args.attention_impl, remat=args.remat)
    kw = hf_config_kwargs(args, max_len)
    if not args.torch_lengths:
        cfg = config_from_hf({"model_type": "qwen2", **kw}, "bench model", **overrides)
        return None, cfg, init_params(cfg, jax.random.key(0))
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**kw), attn_implementation="sdpa")
    model = model.to(torch.float32).train()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        imported = load_hf(d, **overrides)
    return model, imported.cfg, jax.device_put(imported.params)


def torch_step_fn(model, batch: dict, hf_labels: bool):
    """One PyTorch training step's forward + backward on `batch`, returning
    the loss: the mean cross-entropy of the response tokens, as ours (the
    logits at t predict t + 1 where loss_mask[t + 1] = 1)."""
    import torch

    ids = torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    lm = np.asarray(batch["loss_mask"])
    resp = int(lm[0].sum())
    assert (lm[:, -resp:] == 1).all() and lm.sum() == resp * lm.shape[0], "the response must be the tail"
    labels = torch.where(torch.tensor(lm, dtype=torch.bool), ids, torch.full_like(ids, -100))

    def step():
        model.zero_grad(set_to_none=True)
        if hf_labels:  # transformers' own loss, from logits at every position
            loss = model(input_ids=ids, labels=labels).loss
        else:  # logits only at the positions that predict response tokens
            logits = model(input_ids=ids, logits_to_keep=resp + 1).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -resp:].reshape(-1))
        loss.backward()
        return float(loss.detach())

    return step


def compare_with_torch(model, cfg, params, args) -> dict:
    """Median step seconds of PyTorch and of our steps at every length; the
    steps of one length run round-robin."""
    out = {}
    rng = jax.random.key(1)
    for seq in args.torch_lengths:
        batch = make_batch(args.batch, seq, cfg.vocab_size)
        steps = {"torch": torch_step_fn(model, batch, hf_labels=False)}
        if args.torch_hf_labels:
            steps["torch_hf_labels"] = torch_step_fn(model, batch, hf_labels=True)
        for name in TORCH_VARIANTS:
            compiled = jitted_step().lower(params, batch, rng, cfg, focus_config(name)).compile()

            def run(compiled=compiled, batch=batch):
                (loss, _), grads = compiled(params, batch, rng)
                jax.block_until_ready(grads)
                return float(loss)

            steps[name] = run
        losses = {name: fn() for name, fn in steps.items()}  # warm-up
        times = {name: [] for name in steps}
        names = list(steps)
        for r in range(args.torch_repeats):
            # Round-robin, starting one further each round: no step always
            # runs right after the same other one (PyTorch's OpenMP threads
            # and freed memory linger into whatever runs next).
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        row = {f"{name}_s": statistics.median(t) for name, t in times.items()}
        row["loss_abs_diff_torch_vs_sft_causal"] = abs(losses["torch"] - losses["sft_causal"])
        out[str(seq)] = row
    return out


def parse_lengths(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024, help="cost section: the shorter length; the other is twice it")
    ap.add_argument(
        "--torch-lengths",
        type=parse_lengths,
        default=[1024, 4096, 8192],
        help="comma-separated lengths of the PyTorch comparison ('' skips it)",
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--attention-impl", default="blockwise")
    ap.add_argument("--remat", default="none", help="our layers' remat policy (training's default: none)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant, cost section")
    ap.add_argument("--torch-repeats", type=int, default=4, help="timed rounds, PyTorch comparison")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--torch-hf-labels", action="store_true", help="also time transformers' labels= loss")
    ap.add_argument(
        "--variants",
        type=lambda t: [x for x in t.split(",") if x],
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} for the cost section (sft_causal and "
        "focusft_first_order always run; focusft_full is the slowest to compile)",
    )
    args = ap.parse_args(argv)
    bad = [n for n in args.variants if n not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    args.variants = [n for n in VARIANTS if n in set(args.variants) | {"sft_causal", "focusft_first_order"}]
    t_start = time.perf_counter()
    lengths = [args.seq, 2 * args.seq]
    model, cfg, params = build_models(args, max(lengths + args.torch_lengths))
    config = {
        **vars(args),
        "lengths": lengths,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    if model is not None:
        import torch
        import transformers

        config.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            torch_num_threads=torch.get_num_threads(),
            torch_attention=model.config._attn_implementation,
        )
    results: dict = {"config": config, "variants": {}}

    for seq in lengths:
        batch = make_batch(args.batch, seq, cfg.vocab_size)
        for name in args.variants:
            results["variants"].setdefault(name, {})[str(seq)] = measure(
                cfg, focus_config(name), params, batch, args.repeats
            )
    v = results["variants"]
    short, long = str(lengths[0]), str(lengths[1])
    ratios = {}
    for seq in (short, long):
        base = v["sft_causal"][seq]
        for name in [n for n in args.variants if n != "sft_causal"]:
            for key in ("flops", "temp_bytes", "median_step_s"):
                ratios[f"{name}/sft_causal {key} @{seq}"] = v[name][seq][key] / base[key]
    for seq in (short, long):
        for name in args.variants:
            ratios[f"{name} step/forward flops @{seq}"] = v[name][seq]["flops"] / v[name][seq]["forward_flops"]
    for name in args.variants:
        ratios[f"{name} temp_bytes {long}/{short}"] = v[name][long]["temp_bytes"] / v[name][short]["temp_bytes"]
    targets = {
        "first_order flops <= 1.6x sft": all(
            ratios[f"focusft_first_order/sft_causal flops @{s}"] <= 1.6 for s in (short, long)
        ),
        "first_order temp memory <= 1.2x sft": all(
            ratios[f"focusft_first_order/sft_causal temp_bytes @{s}"] <= 1.2 for s in (short, long)
        ),
        "focusft memory growth 2x length <= 2.3x": ratios[f"focusft_first_order temp_bytes {long}/{short}"] <= 2.3,
    }

    if model is not None:
        vs = compare_with_torch(model, cfg, params, args)
        results["vs_torch"] = vs
        for seq, row in vs.items():
            ratios[f"vs_torch: sft_causal/torch step_s @{seq}"] = row["sft_causal_s"] / row["torch_s"]
            if "torch_hf_labels_s" in row:
                ratios[f"vs_torch: sft_causal/torch_hf_labels step_s @{seq}"] = (
                    row["sft_causal_s"] / row["torch_hf_labels_s"]
                )
            for base in ("sft_causal", "sft_glm_bidir"):
                ratios[f"vs_torch: focusft_first_order/{base} step_s @{seq}"] = (
                    row["focusft_first_order_s"] / row[f"{base}_s"]
                )
        targets["sft step <= torch step at every length"] = all(
            ratios[f"vs_torch: sft_causal/torch step_s @{s}"] <= 1.0 for s in vs
        )
        for base in ("sft_causal", "sft_glm_bidir"):
            targets[f"first_order step <= 1.6x {base} step at every length"] = all(
                ratios[f"vs_torch: focusft_first_order/{base} step_s @{s}"] <= 1.6 for s in vs
            )
    results["ratios"] = ratios
    results["targets"] = targets
    config["load_average_end"] = os.getloadavg()
    config["bench_seconds"] = time.perf_counter() - t_start
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""The paper's run planned without the hardware (issue 15 item 3).

The real training step (`focusft_jax.trainer.train_step`, jitted as
`focusft_jax.train` jits it: state donated, state shardings in = out) is
lowered and compiled on abstract inputs only (`jax.ShapeDtypeStruct` with
shardings; nothing is allocated) on simulated CPU devices, and XLA's memory
analysis gives the per-device bytes of one step:

* argument: the sharded train state (params, AdamW moments, step) and batch;
* output: the new state; it aliases the donated argument (alias bytes), so
  the state is counted once;
* temp: everything the step allocates on top (activations kept for the
  backward, the float32 gradient accumulator, the fast weights, attention
  blocks, collectives' buffers);
* peak estimate = argument + output - alias + temp.

XLA:CPU assigns buffers and fuses differently from XLA:GPU/TPU, so the bytes
are an estimate of what an accelerator needs, not a measurement of one.

FLOPs are the analytic model FLOPs of `focusft_jax.flops.step_flops` (the
step's exact structure: FocuSFT's inner passes over the top layers, logits
only at scored positions, attention counted from the mask's attended pairs).
XLA's cost analysis is not used for them: it counts a loop body once, and
the layers, the micro-batches and the blockwise attention are loops. Remat
recomputation is not in model FLOPs, as MFU defines them. The step-time
columns divide the per-device FLOPs by a chip's dense bf16 peak: at 100%
(a lower bound no run reaches) and at an assumed MFU (`--mfu`, 40% by
default: an assumption, not a measurement).

Rows (`--grid paper`, the default): Qwen2.5-7B shapes, the method, optimizer
and batch layout of configs/focusft_qwen25_7b.yaml / sft_qwen25_7b.yaml (one
example per data-parallel shard per micro-batch, batch_size / micro_batch_size
micro-batches accumulated), varied one axis at a time: remat none/dots/full;
4K, 16K, 32K tokens; float32 master params (bf16 compute) against bf16
params; FocuSFT against SFT; and 64 devices as fsdp 8 x tensor 8 at 32K.
`--grid gpu` is the plan's smallest real counterpart, Qwen2.5-0.5B at 4K tokens
on one device; with `--measure N` each row also runs N timed steps on random
weights where JAX runs (bench/gpu_checks.sh, on a GPU machine), and reports
the measured step time, MFU and peak memory in use beside the plan.
`--grid tiny` compiles a toy model (for the tests).

    python bench/scale.py                 # JSON on stdout, Markdown table on stderr
    python bench/scale.py --grid gpu --measure 5   # on a GPU
    python bench/scale.py --grid tiny

The simulated device count is set before JAX starts (64, the largest mesh);
a mesh of 8 uses the first 8.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIMULATED_DEVICES = 64
if __name__ == "__main__" and "jax" not in sys.modules:
    if "--measure" not in " ".join(sys.argv):  # a plan compiles for simulated CPU devices; --measure runs where JAX runs
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={SIMULATED_DEVICES}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from focusft_jax import model as M  # noqa: E402
from focusft_jax.attention import attention_meta  # noqa: E402
from focusft_jax.config import load_config  # noqa: E402
from focusft_jax.flops import step_flops, workload_from_meta  # noqa: E402
from focusft_jax.loss import scored_positions  # noqa: E402
from focusft_jax.optim import make_optimizer  # noqa: E402
from focusft_jax.sharding import batch_sharding, data_parallel_size, make_mesh, param_shardings  # noqa: E402
from focusft_jax.trainer import init_state, init_state_sharded, state_shardings, train_step  # noqa: E402

# Dense bf16 peak FLOP/s per chip (vendor datasheets; H100 and H200 share the
# SXM compute die, so one number).
PEAK_FLOPS = {"h100_h200": 989e12, "tpu_v5p": 459e12}
CHIP_OF_DEVICE_KIND = {"H100": "h100_h200", "H200": "h100_h200", "TPU v5p": "tpu_v5p"}  # jax Device.device_kind
GIB = 2**30
DEVICE_MEMORY_GB = 80  # the budget: an 80 GB accelerator

# Qwen2.5-7B (its config.json): 28 layers, hidden 3584, FFN 18944, 28 query
# and 4 key/value heads of 128, vocab 152064, untied head, q/k/v biases.
QWEN25_7B = M.ModelConfig(
    family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
    tie_word_embeddings=False, qkv_bias=True,
)
TINY = M.ModelConfig(
    family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One planned step: the model, method (a configs/ file), length and numerics.
    micro_batches: accumulated micro-batches per step; each holds one example
    per data-parallel shard (fsdp x data)."""

    name: str
    model: M.ModelConfig
    config: str  # a file under configs/: method, optimizer, numerics
    seq: int
    fsdp: int
    tensor: int = 1
    micro_batches: int = 4
    remat: str | None = None  # None: the config's
    param_dtype: str | None = None
    attention_impl: str | None = None


def host_batch(batch: int, seq: int, response: int) -> dict:
    """numpy [batch, seq] arrays, the last `response` tokens scored, plus the loss keys [batch, response]."""
    ids = np.zeros((batch, seq), np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq - response:] = 1
    arrays = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int32), "loss_mask": loss_mask}
    arrays.update(scored_positions(arrays, response))
    return arrays


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _bytes_on_first_device(tree) -> int:
    """Bytes of the shards of `tree`'s abstract leaves that one device holds."""
    leaves = jax.tree.leaves(tree)
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves
                   if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)))


def plan_row(row: Row, mfu: float = 0.4, measure_steps: int = 0) -> dict:
    """Compiles one train step on abstract inputs; returns its per-device numbers.
    measure_steps > 0: then also allocates a random state and batch on the
    devices, runs the compiled step once to warm up and `measure_steps` times
    timed, and adds the measured step time, MFU and (where the backend
    reports it) the device's peak memory in use."""
    cfg = load_config(ROOT / "configs" / row.config)
    numerics = cfg.model.numerics()
    chosen = {"remat": row.remat, "param_dtype": row.param_dtype, "attention_impl": row.attention_impl}
    numerics.update({k: v for k, v in chosen.items() if v})
    model_cfg = row.model.replace(**numerics)
    fcfg = cfg.method
    mesh = make_mesh(data=1, fsdp=row.fsdp, tensor=row.tensor)
    n_dev = row.fsdp * row.tensor
    micro = data_parallel_size(mesh)  # one example per data-parallel shard

    t0 = time.perf_counter()
    abstract_params = jax.eval_shape(lambda: M.init_params(model_cfg, jax.random.key(0)))
    params = _abstract(abstract_params, param_shardings(abstract_params, M.logical_axes(model_cfg), mesh))
    optimizer, _ = make_optimizer(
        abstract_params, lr=cfg.optim.lr, total_steps=1000, warmup_ratio=cfg.optim.warmup_ratio,
        weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
    )
    # The state's shardings as train.py places it (trainer.init_state_sharded).
    shardings = state_shardings(params, optimizer)
    state = _abstract(jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params), shardings)
    response = max(1, row.seq // 10)  # the response is the last tenth, as in bench/step.py
    host = host_batch(micro, row.seq, response)
    batch = {
        k: jax.ShapeDtypeStruct((row.micro_batches,) + v.shape, v.dtype, sharding=batch_sharding(mesh, 3, 1))
        for k, v in host.items()
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = jax.jit(train_step, static_argnums=(3, 4, 5), donate_argnums=(0,), out_shardings=(shardings, None))
    compiled = step.lower(state, batch, rng, model_cfg, fcfg, optimizer).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    meta = attention_meta(jnp.asarray(host["attention_mask"]), jnp.asarray(host["loss_mask"]), kind=fcfg.attention)
    work = workload_from_meta(np.asarray(meta.kv_start), np.asarray(meta.kv_end), host["loss_index"])
    flops_per_device = step_flops(model_cfg, fcfg, work)["total"] * row.micro_batches / n_dev
    out = {
        "name": row.name, "method": "focusft" if fcfg.num_inner_steps else "sft", "attention": fcfg.attention,
        "seq": row.seq, "remat": model_cfg.remat, "param_dtype": model_cfg.param_dtype,
        "compute_dtype": model_cfg.compute_dtype, "attention_impl": model_cfg.attention_impl,
        "devices": n_dev, "fsdp": row.fsdp, "tensor": row.tensor,
        "examples_per_step": micro * row.micro_batches, "micro_batches": row.micro_batches,
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "flops_per_device": float(flops_per_device), "compile_s": round(compile_s, 1),
    }
    # What the shardings say one device holds, to set beside XLA's argument bytes.
    out["state_bytes_per_device"] = _bytes_on_first_device(state)
    out["batch_bytes_per_device"] = _bytes_on_first_device(batch)
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["peak_gib"] = out["peak_bytes"] / GIB
    out["fits_80gb_with_20pct_headroom"] = out["peak_bytes"] <= 0.8 * DEVICE_MEMORY_GB * 1e9
    for chip, peak in PEAK_FLOPS.items():
        out[f"step_s_at_peak[{chip}]"] = flops_per_device / peak
        out[f"step_s_at_{round(mfu * 100)}pct_mfu[{chip}]"] = flops_per_device / (peak * mfu)
    if measure_steps:
        out.update(_measure(compiled, model_cfg, optimizer, params, host, mesh, row, measure_steps, flops_per_device))
    return out


def _measure(compiled, model_cfg, optimizer, abstract_params, host, mesh, row, steps, flops_per_device) -> dict:
    """Runs `compiled` on a random state and batch laid out as the plan's abstract ones."""
    p_shard = jax.tree.map(lambda p: p.sharding, abstract_params)
    params = jax.jit(lambda k: M.init_params(model_cfg, k), out_shardings=p_shard)(jax.random.key(0))
    state = init_state_sharded(params, optimizer)
    stacked = {k: np.stack([v] * row.micro_batches) for k, v in host.items()}
    rng = np.random.default_rng(0)  # random tokens: the step's cost does not depend on them
    stacked["input_ids"] = rng.integers(0, model_cfg.vocab_size, stacked["input_ids"].shape).astype(np.int32)
    stacked["loss_target"] = rng.integers(0, model_cfg.vocab_size, stacked["loss_target"].shape).astype(np.int32)
    batch = {k: jax.device_put(v, batch_sharding(mesh, 3, 1)) for k, v in stacked.items()}
    key = jax.random.key(0)
    state, metrics = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    device = jax.devices()[0]
    kind = device.device_kind
    chip = next((c for name, c in CHIP_OF_DEVICE_KIND.items() if name in kind), None)
    peak = PEAK_FLOPS.get(chip)
    stats = device.memory_stats() or {}
    return {
        "measured_on": kind, "measured_step_s": t, "measured_step_s_all": times,
        "measured_loss": float(metrics["loss"]),
        "measured_mfu": flops_per_device / (t * peak) if peak else None,
        "measured_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def paper_grid() -> list[Row]:
    F, S = "focusft_qwen25_7b.yaml", "sft_qwen25_7b.yaml"
    m = QWEN25_7B
    rows = [Row(f"focusft 4k remat={r}", m, F, 4096, 8, remat=r) for r in ("none", "dots", "full")]
    rows += [Row(f"focusft 4k bf16 params remat={r}", m, F, 4096, 8, remat=r, param_dtype="bfloat16")
             for r in ("dots", "full")]
    rows += [Row(f"focusft {s // 1024}k", m, F, s, 8) for s in (16384, 32768)]
    rows += [Row(f"sft {s // 1024}k", m, S, s, 8) for s in (4096, 16384, 32768)]
    rows += [Row("sft 4k remat=none", m, S, 4096, 8, remat="none")]
    rows += [Row(f"{k} 32k 64 devices fsdp8 x tensor8", m, c, 32768, 8, tensor=8) for k, c in (("focusft", F), ("sft", S))]
    return rows


# Qwen2.5-0.5B (its config.json): the ~0.5B model of the GPU check.
QWEN25_05B = M.ModelConfig(
    family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
    num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, max_position_embeddings=32768,
    tie_word_embeddings=True, qkv_bias=True,
)


def gpu_grid() -> list[Row]:
    """The plan's smallest real counterpart, for one GPU: Qwen2.5-0.5B at 4K tokens."""
    F, S = "focusft_qwen25_7b.yaml", "sft_qwen25_7b.yaml"
    rows = [Row("0.5b sft 4k", QWEN25_05B, S, 4096, 1), Row("0.5b focusft 4k", QWEN25_05B, F, 4096, 1),
            Row("0.5b focusft 4k remat=none", QWEN25_05B, F, 4096, 1, remat="none")]
    # where the time goes: the same steps with another attention implementation
    rows += [Row(f"0.5b {k} 4k {impl} attention", QWEN25_05B, c, 4096, 1, attention_impl=impl)
             for impl in ("dense", "pallas") for k, c in (("sft", S), ("focusft", F))]
    return rows


def tiny_grid() -> list[Row]:
    F = "focusft_qwen25_7b.yaml"
    return [Row(f"tiny remat={r}", TINY, F, 256, 8, micro_batches=2, remat=r) for r in ("none", "full")] + [
        Row("tiny bf16 params", TINY, F, 256, 8, micro_batches=2, param_dtype="bfloat16"),
        Row("tiny sft fsdp4 x tensor2", TINY, "sft_qwen25_7b.yaml", 256, 4, tensor=2, micro_batches=2),
    ]


def markdown(rows: list[dict], mfu: float) -> str:
    pct = round(mfu * 100)
    head = ("| row | method | tokens | devices | params | remat | state GiB | temp GiB | peak GiB | fits 80 GB with 20% spare | "
            f"TFLOP/device | H100/H200 s @{pct}% MFU | TPU v5p s @{pct}% MFU |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        state = r["argument_bytes"] / GIB
        lines.append(
            f"| {r['name']} | {r['method']} | {r['seq']} | {r['fsdp']}x{r['tensor']} | {r['param_dtype']} | "
            f"{r['remat']} | {state:.1f} | {r['temp_bytes'] / GIB:.1f} | {r['peak_gib']:.1f} | "
            f"{'yes' if r['fits_80gb_with_20pct_headroom'] else 'no'} | {r['flops_per_device'] / 1e12:.0f} | "
            f"{r[f'step_s_at_{pct}pct_mfu[h100_h200]']:.2f} | {r[f'step_s_at_{pct}pct_mfu[tpu_v5p]']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=("paper", "gpu", "tiny"), default="paper")
    ap.add_argument("--measure", type=int, default=0, metavar="STEPS",
                    help="also run each row for real on the devices, timing STEPS steps (for a GPU)")
    ap.add_argument("--only", default="", help="comma-separated substrings: compile only the rows whose name has one")
    ap.add_argument("--skip", default="", help="comma-separated substrings: leave out the rows whose name has one")
    ap.add_argument("--mfu", type=float, default=0.4, help="the assumed MFU of the step-time column")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    grid = {"paper": paper_grid, "gpu": gpu_grid, "tiny": tiny_grid}[args.grid]()
    if args.only:
        grid = [r for r in grid if any(s in r.name for s in args.only.split(","))]
    if args.skip:
        grid = [r for r in grid if not any(s in r.name for s in args.skip.split(","))]
    rows = []
    for row in grid:
        rows.append(plan_row(row, args.mfu, args.measure))
        print(f"{row.name}: peak {rows[-1]['peak_gib']:.1f} GiB/device, compiled in {rows[-1]['compile_s']} s",
              file=sys.stderr, flush=True)
    doc = {"jax": jax.__version__, "backend_compiled_on": jax.default_backend(), "assumed_mfu": args.mfu,
           "peak_flops": PEAK_FLOPS, "rows": rows}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(markdown(rows, args.mfu), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()

"""Benchmark: blockwise attention vs the dense reference on causal masks.

For each sequence length it times, under `jax.jit`, the forward pass and the
forward+backward pass (grad of sum(o * w) wrt q, k, v) of

  dense       `attention.dense_attention` (materialises the S x S scores),
  blockwise   `blockwise.blockwise_attention` skipping fully masked blocks,
  noskip      the same with `skip_masked_blocks=False` (every block computed),
  pallas      `pallas_attention.pallas_attention` (Pallas kernels; by default
              only on GPU and TPU, where they are Triton / Mosaic: on CPU they
              would run in interpret mode, far too slow to time; --pallas on
              forces it),

and reports XLA's temporary buffer size of each compiled function
(`compiled.memory_analysis().temp_size_in_bytes`), also for a second-order
gradient (grad wrt q, k, v of |grad_q loss|^2; timed with
--time-second-order). Prints one JSON document.

    python bench/attention.py                      # 1K, 2K, 4K on CPU
    python bench/attention.py --seqs 512 1024 --block-q 128 --block-k 256
    python bench/attention.py --seqs 4096 8192 --dtype bfloat16 --no-dense   # GPU: adds pallas
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from focusft_jax.attention import AttnMeta, dense_attention  # noqa: E402
from focusft_jax.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blockwise_attention  # noqa: E402
from focusft_jax import pallas_attention as pallas  # noqa: E402


def _time(fn, args, reps):
    """Best wall time in ms of a compiled fn over `reps` calls (after one
    warm-up call). The minimum, not the median, because a shared CPU host
    only ever adds time."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return round(1e3 * min(times), 2)


def _measure(attn, args, w, reps, timed_second_order):
    def fwd(q, k, v):
        return attn(q, k, v)

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * w)

    def fwd_bwd(q, k, v):
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    def meta(q, k, v):
        # grad of a function of grad (the "full" meta-gradient shape)
        gq = jax.grad(loss)(q, k, v)
        return jnp.sum(gq.astype(jnp.float32) ** 2)

    out = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd), ("second_order", jax.grad(meta, argnums=(0, 1, 2)))):
        compiled = jax.jit(fn).lower(*args).compile()
        mem = compiled.memory_analysis()
        if name != "second_order" or timed_second_order:
            out[f"{name}_ms"] = _time(compiled, args, reps)
        out[f"{name}_temp_MiB"] = round(mem.temp_size_in_bytes / 2**20, 2) if mem is not None else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--q-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-q", type=int, default=DEFAULT_BLOCK_Q)
    ap.add_argument("--block-k", type=int, default=DEFAULT_BLOCK_K)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--time-second-order", action="store_true", help="also time grad-of-grad (else memory only)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference (long sequences)")
    ap.add_argument("--pallas", default="auto", choices=["auto", "on", "off"],
                    help="time the Pallas kernels: auto (default) = on GPU and TPU (on CPU they only interpret)")
    # None: the kernel family's defaults (Triton and Mosaic blocks differ).
    ap.add_argument("--pallas-block-q", type=int, default=None)
    ap.add_argument("--pallas-block-k", type=int, default=None)
    a = ap.parse_args()

    dtype = jnp.dtype(a.dtype)
    with_pallas = a.pallas == "on" or (a.pallas == "auto" and jax.default_backend() in ("gpu", "tpu"))
    results = []
    for s in a.seqs:
        kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(s), 4)
        q = jax.random.normal(kq, (a.batch, s, a.q_heads, a.head_dim), dtype)
        k = jax.random.normal(kk, (a.batch, s, a.kv_heads, a.head_dim), dtype)
        v = jax.random.normal(kv, (a.batch, s, a.kv_heads, a.head_dim), dtype)
        w = jax.random.normal(kw, q.shape, jnp.float32)
        idx = jnp.arange(s, dtype=jnp.int32)
        start = jnp.zeros((a.batch, s), jnp.int32)
        end = jnp.broadcast_to(idx + 1, (a.batch, s))  # causal
        scale = a.head_dim**-0.5

        impls = {} if a.no_dense else {"dense": partial(dense_attention, meta=AttnMeta(start, end), scale=scale)}
        for name, skip in (("blockwise", True), ("noskip", False)):
            impls[name] = partial(
                blockwise_attention,
                kv_start=start,
                kv_end=end,
                scale=scale,
                block_q=a.block_q,
                block_k=a.block_k,
                skip_masked_blocks=skip,
            )
        if with_pallas:
            impls["pallas"] = partial(
                pallas.pallas_attention,
                kv_start=start,
                kv_end=end,
                scale=scale,
                block_q=a.pallas_block_q,
                block_k=a.pallas_block_k,
            )
        row = {"seq": s}
        for name, attn in impls.items():
            row[name] = _measure(attn, (q, k, v), w, a.reps, a.time_second_order)
        if "dense" in row:
            row["blockwise_vs_dense_fwd_bwd_speedup"] = round(
                row["dense"]["fwd_bwd_ms"] / row["blockwise"]["fwd_bwd_ms"], 2
            )
        if "pallas" in row:
            row["pallas_vs_blockwise_fwd_bwd_speedup"] = round(
                row["blockwise"]["fwd_bwd_ms"] / row["pallas"]["fwd_bwd_ms"], 2
            )
        row["skip_vs_noskip_fwd_bwd_speedup"] = round(row["noskip"]["fwd_bwd_ms"] / row["blockwise"]["fwd_bwd_ms"], 2)
        results.append(row)
        print(f"done seq={s}", file=sys.stderr, flush=True)

    print(
        json.dumps(
            {
                "backend": jax.default_backend(),
                "device": str(jax.devices()[0]),
                "mask": "causal",
                "batch": a.batch,
                "q_heads": a.q_heads,
                "kv_heads": a.kv_heads,
                "head_dim": a.head_dim,
                "dtype": a.dtype,
                "block_q": a.block_q,
                "block_k": a.block_k,
                "pallas_block_q": a.pallas_block_q if with_pallas else None,
                "pallas_block_k": a.pallas_block_k if with_pallas else None,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

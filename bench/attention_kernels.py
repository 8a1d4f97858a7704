"""Attention kernels side by side on an accelerator (issue 16's GPU check).

One attention layer of Qwen2.5-7B's shape (28 query heads, 4 key/value
heads, head_dim 128, bf16), one example, FocuSFT's glm_bidir mask with the
response the last tenth (and causal for cuDNN's comparison). For each
sequence length: forward + backward (the gradients of q, k and v) of

* pallas     the project's Pallas (Triton) flash attention, glm_bidir;
* blockwise  the pure-JAX blockwise flash attention, glm_bidir;
* dense      the S x S reference, glm_bidir (only where --dense-max allows);
* cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`, causal
             (cuDNN has no glm_bidir mask: the same-size causal call is the
             speed reference the issue names).

Each is timed as the median of --reps runs after one warm-up (compile)
call, in the same process, round-robin. Also the largest relative error of
the pallas output and gradients against dense (the same bf16 inputs) at the
lengths dense runs. Prints one JSON document. On a CPU, the pallas kernels
would run in interpret mode (far too slow to time): use a GPU.

    python bench/attention_kernels.py --seqs 4096 16384 32768
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from focusft_jax.attention import ATTENTION_IMPLS, attention_meta  # noqa: E402


def _inputs(seq: int, hq: int, hkv: int, d: int, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, seq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (1, seq, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (1, seq, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (1, seq, hq, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _fwd_bwd(attn):
    """jit of (q, k, v, do) -> (o, dq, dk, dv)."""
    def f(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o,) + vjp(do)
    return jax.jit(f)


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--q-heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense-max", type=int, default=8192, help="longest sequence dense attention runs at")
    ap.add_argument("--impls", default="pallas,blockwise,dense,cudnn")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    dtype = jnp.bfloat16
    scale = args.head_dim ** -0.5
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "shape": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": 1},
           "dtype": "bfloat16", "mask": "glm_bidir, response = last tenth (cudnn: causal)", "rows": []}
    for seq in args.seqs:
        q, k, v, do = _inputs(seq, args.q_heads, args.kv_heads, args.head_dim, dtype)
        mask = jnp.ones((1, seq), jnp.int32)
        loss_mask = jnp.zeros((1, seq), jnp.int32).at[:, seq - seq // 10:].set(1)
        meta = attention_meta(mask, loss_mask, kind="glm_bidir")
        row = {"seq": seq}
        results = {}
        for impl in impls:
            if impl == "dense" and seq > args.dense_max:
                continue
            if impl == "cudnn":
                def attn(q, k, v):
                    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
            else:
                def attn(q, k, v, impl=impl):
                    return ATTENTION_IMPLS[impl](q, k, v, meta, scale)
            fn = _fwd_bwd(attn)
            try:
                row[f"{impl}_fwd_bwd_s"] = _time(fn, (q, k, v, do), args.reps)
                if impl in ("pallas", "dense", "blockwise"):
                    results[impl] = fn(q, k, v, do)
            except Exception as e:  # a kernel the backend lacks is reported, not fatal to the others
                row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "pallas_fwd_bwd_s" in row:
            for other in ("blockwise", "cudnn", "dense"):
                if f"{other}_fwd_bwd_s" in row:
                    row[f"{other}_over_pallas"] = row[f"{other}_fwd_bwd_s"] / row["pallas_fwd_bwd_s"]
        if "pallas" in results and "dense" in results:
            # bf16 inputs, float32 softmax in both: the difference is bf16 rounding of o and the gradients
            names = ("o", "dq", "dk", "dv")
            row["pallas_vs_dense_rel_err"] = {n: _rel_err(a, b) for n, a, b in zip(names, results["pallas"], results["dense"])}
        if "pallas" in results and "blockwise" in results:
            names = ("o", "dq", "dk", "dv")
            row["pallas_vs_blockwise_rel_err"] = {
                n: _rel_err(a, b) for n, a, b in zip(names, results["pallas"], results["blockwise"])}
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del results
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

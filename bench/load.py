"""Checkpoint import: peak host memory and time, old (host-stacked) vs new (sharded) path.

Writes a random float32 Qwen2 checkpoint of about 1 GB (hidden 2048, 16
layers, untied, safetensors shards of at most 500 MB, with config.json), then
loads it onto 8 simulated CPU devices with an fsdp mesh, each path in its own
subprocess, and prints JSON: peak RSS growth over the process's baseline
(ru_maxrss), the same minus the loaded arrays' own bytes, both as fractions of
the checkpoint size, and the load time.

On simulated CPU devices the device buffers ARE host memory, so the loaded
params themselves are in RSS: the floor of the raw growth is 1x the
checkpoint (`floor_x`); what the path adds is `transient_x` = peak growth
minus the resident params.

    python bench/load.py [--out DIR] [--layers 16] [--hidden 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import jax
from focusft_jax import hf
from focusft_jax.model import logical_axes
from focusft_jax.sharding import make_mesh, param_shardings, place
src, path = sys.argv[1], sys.argv[2]
mesh = make_mesh(1, -1, 1)
jax.block_until_ready(jax.device_put(1.0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if path == "new":
    params = hf.load_hf(src, mesh=mesh).params
else:  # what the trainer did before: the whole model on the host and device 0, then resharded
    m = hf.load_hf_on_host(src)
    params = place(m.params, param_shardings(m.params, logical_axes(m.cfg), mesh))
    del m
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
resident = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
print(json.dumps({"seconds": seconds, "peak_growth_bytes": peak - base, "resident_params_bytes": resident}))
"""


def write_checkpoint(d: Path, layers: int, hidden: int, ffn: int, vocab: int, max_shard: int = 500 * 2**20) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    heads, kv, hd = hidden // 128, 2, 128
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               head_dim=hd, tie_word_embeddings=False, torch_dtype="float32", hidden_act="silu")
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, hidden), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    rng = np.random.default_rng(0)
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        if cur and size + n > max_shard:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname))
        weight_map.update({k: fname for k in shard})
        total += sum(v.nbytes for v in shard.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    d = Path(args.out or tmp.name)
    d.mkdir(parents=True, exist_ok=True)
    total = write_checkpoint(d, args.layers, args.hidden, args.ffn, args.vocab)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    rows = {}
    for path in ("old", "new"):
        r = subprocess.run([sys.executable, "-c", _CHILD, str(d), path], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{path}: {r.stderr[-2000:]}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows[path] = {
            "seconds": round(m["seconds"], 3),
            "peak_growth_x": round(m["peak_growth_bytes"] / total, 3),
            "transient_x": round((m["peak_growth_bytes"] - m["resident_params_bytes"]) / total, 3),
            "peak_growth_mb": round(m["peak_growth_bytes"] / 2**20, 1),
        }
    print(json.dumps({
        "checkpoint_mb": round(total / 2**20, 1), "devices": 8, "mesh": "fsdp=8",
        "floor_x": 1.0, "note": "CPU simulated devices: device buffers are host memory, so peak_growth_x >= 1; "
                                "transient_x = peak growth minus the loaded arrays' bytes",
        "old": rows["old"], "new": rows["new"],
        "time_ratio_new_over_old": round(rows["new"]["seconds"] / rows["old"]["seconds"], 3),
    }, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

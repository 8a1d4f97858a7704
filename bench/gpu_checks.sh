#!/usr/bin/env bash
# The device checks, as one prepared script for a GPU machine (the device
# tool's $OUT holds what comes back; elsewhere, /tmp/gpu_checks):
#   1. bench/scale.py --grid gpu --measure: the 7B plan's smallest real
#      counterpart (random Qwen2.5-0.5B, 4K tokens, SFT and FocuSFT), its
#      GPU-compiled memory plan, measured step time, MFU and peak memory;
#   2. the README's tiny default, trained for 20 steps on the GPU.
# Runs with the machine's own python3 (its JAX, flax, optax, orbax,
# transformers); nothing is installed or downloaded.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 270 python3 bench/scale.py --grid gpu --measure 5 --out "$OUT/scale_gpu.json" > /dev/null 2> "$OUT/scale_gpu.log"
echo "scale rc=$?"; tail -8 "$OUT/scale_gpu.log"
timeout 90 python3 train.py --config configs/tiny.yaml train.max_steps=20 train.output_dir=/tmp/tiny_gpu \
  logging.progress=false > "$OUT/tiny_gpu.log" 2>&1
echo "tiny rc=$?"; tail -5 "$OUT/tiny_gpu.log"

#!/usr/bin/env bash
# The device checks, as one prepared script for a GPU machine (the device
# tool's $OUT holds what comes back; elsewhere, /tmp/gpu_checks). Arguments
# pick the checks (default: all):
#   scale      bench/scale.py --grid gpu --measure: the 7B plan's smallest real
#              counterpart (random Qwen2.5-0.5B, 4K tokens, SFT and FocuSFT,
#              remat full/none): GPU-compiled memory plan, measured step time,
#              MFU and peak memory;
#   scale-attn the same steps with dense and with pallas attention (where the
#              time goes);
#   attention  bench/attention_kernels.py: pallas / blockwise / dense / cuDNN
#              forward+backward at 4K, 16K, 32K, and pallas against dense;
#   tiny       the README's tiny default, trained for 20 steps on the GPU.
# Runs with the machine's own python3 (its JAX, flax, optax, orbax,
# transformers); nothing is installed or downloaded.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
checks=${*:-scale scale-attn attention tiny}
{ nvidia-smi -L; python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for check in $checks; do
  case $check in
    scale) timeout 270 python3 bench/scale.py --grid gpu --skip attention --measure 5 --out "$OUT/scale_gpu.json" \
             > /dev/null 2> "$OUT/scale_gpu.log" ;;
    scale-attn) timeout 240 python3 bench/scale.py --grid gpu --only "attention" --measure 5 \
             --out "$OUT/scale_gpu_attention.json" > /dev/null 2> "$OUT/scale_gpu_attention.log" ;;
    attention) timeout 240 python3 bench/attention_kernels.py --seqs 4096 16384 32768 \
             > "$OUT/attention_kernels.json" 2> "$OUT/attention_kernels.log" ;;
    tiny) timeout 90 python3 train.py --config configs/tiny.yaml train.max_steps=20 train.output_dir=/tmp/tiny_gpu \
             logging.progress=false logging.tensorboard=false > "$OUT/tiny_gpu.log" 2>&1 ;;
    *) echo "unknown check $check"; continue ;;
  esac
  echo "$check rc=$?"
done
tail -n 4 "$OUT"/*.log

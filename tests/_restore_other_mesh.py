"""Run with 8 simulated devices (tests/test_checkpoint.py): save a train state
sharded on one mesh, restore it onto another, print what came back."""
import json
import sys

import jax
import numpy as np

from focusft_jax.checkpoint import Checkpointer, abstract_like
from focusft_jax.model import ModelConfig, init_params, logical_axes
from focusft_jax.optim import make_optimizer
from focusft_jax.sharding import make_mesh, param_shardings
from focusft_jax.trainer import init_state_sharded

directory = sys.argv[1]
cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
params = init_params(cfg, jax.random.key(0))
opt, _ = make_optimizer(params, lr=1e-3, total_steps=10)


def state_on(mesh):
    p = jax.device_put(params, param_shardings(params, logical_axes(cfg), mesh))
    return init_state_sharded(p, opt)


a = state_on(make_mesh(data=8, fsdp=1, tensor=1))
a = a.replace(step=a.step + 5)
ckpt = Checkpointer(directory, keep=1, async_save=True)
ckpt.save(5, a, {"epoch": 0, "step": 5})
ckpt.close()

target = state_on(make_mesh(data=1, fsdp=4, tensor=2))
ckpt = Checkpointer(directory, keep=1)
b, loader = ckpt.restore(ckpt.latest_step(), abstract_like(target))
same_values = all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
)
same_shardings = all(
    x.sharding == y.sharding for x, y in zip(jax.tree.leaves(target), jax.tree.leaves(b))
)
kernel = b.params["layers"]["gate_proj"]["kernel"]
print(json.dumps({
    "devices": jax.device_count(),
    "same_values": same_values,
    "same_shardings_as_target": same_shardings,
    "gate_kernel_spec": str(kernel.sharding.spec),
    "step": int(b.step),
    "loader": loader,
}))

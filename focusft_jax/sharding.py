"""Device mesh, parameter and batch shardings.

The mesh has three named axes: `data` (pure data parallelism), `fsdp`
(data parallelism with parameters and optimizer state sharded) and `tensor`
(tensor parallelism of heads, FFN and vocabulary). Parameters are sharded by
their logical axis names (`model.logical_axes`) through `LOGICAL_RULES`;
batches are split over `data` x `fsdp`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from focusft_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis -> mesh axis (None: replicated).
LOGICAL_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "head_dim": None,
}


# The launcher's environment that this project reads itself: JAX's own
# initialize() finds the coordinator, process count and id only on the
# clusters it detects (SLURM, Open MPI, TPU pods, ...), not in these.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def distributed_arguments() -> dict:
    """jax.distributed.initialize's coordinator_address / num_processes /
    process_id from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (those set); JAX detects the rest on known clusters."""
    args = {
        "coordinator_address": os.environ.get(ENV_COORDINATOR) or None,
        "num_processes": _env_int(ENV_NUM_PROCESSES),
        "process_id": _env_int(ENV_PROCESS_ID),
    }
    args = {k: v for k, v in args.items() if v is not None}
    n, i = args.get("num_processes"), args.get("process_id")
    if n is not None and n < 1:
        raise ConfigError(f"{ENV_NUM_PROCESSES}={n}: expected a process count >= 1")
    if i is not None and n is not None and not 0 <= i < n:
        raise ConfigError(f"{ENV_PROCESS_ID}={i}: expected a process id in [0, {ENV_NUM_PROCESSES}={n})")
    return args


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls jax.distributed.initialize() when asked ("on"), or with "auto"
    when a multi-host launcher's environment is present (a coordinator
    address, SLURM with several tasks, or a TPU pod's worker list), with the
    coordinator, process count and id of `distributed_arguments`. On CPU the
    processes' collectives go through gloo. Returns whether it initialized."""
    if mode == "off":
        return False
    launcher = (
        ENV_COORDINATOR in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if mode == "on" or launcher:
        kwargs = distributed_arguments()
        try:  # CPU processes need a collectives backend; GPU and TPU ignore this option
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, KeyError, ValueError):  # an older or newer JAX without the option
            pass
        jax.distributed.initialize(**kwargs)
        return True
    return False


def sync_processes(name: str) -> None:
    """A barrier of all processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _devices(n: int, devices) -> str:
    kinds = sorted({str(getattr(d, "platform", "?")) for d in devices})
    return f"{n} device{'s' if n != 1 else ''}" + (f" ({', '.join(kinds)})" if kinds else "")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis of size -1 takes the devices the
    others leave. Fixed sizes whose product is below the device count use the
    first devices. Raises ConfigError (a ValueError) naming the mesh.* keys
    when the sizes ask for more devices than there are, or a -1 axis cannot be
    filled evenly."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = [data, fsdp, tensor]
    asked = " x ".join(f"mesh.{a} ({s})" for a, s in zip(MESH_AXES, sizes))
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if n % rest:
            raise ConfigError(
                f"mesh: {asked}: the fixed axes ({rest} devices) do not divide the {_devices(n, devices)}"
            )
        sizes[sizes.index(-1)] = n // rest
    data, fsdp, tensor = sizes
    if data * fsdp * tensor < n and -1 not in (data, fsdp, tensor):
        # An explicit smaller mesh (e.g. 1 x 1 x 1 for a reference run) uses
        # the first devices.
        devices = devices[: data * fsdp * tensor]
        n = len(devices)
    if data * fsdp * tensor != n:
        raise ConfigError(
            f"mesh: {asked} = {data * fsdp * tensor} devices, but there are only {_devices(n, devices)}; "
            "lower them, or set one to -1 for all remaining devices"
        )
    # Auto axes: XLA propagates shardings from the parameters and batch
    # (explicit sharding-in-types would demand every gather be annotated).
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=devices, axis_types=auto)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of one parameter; a dimension its mesh axis does not
    divide stays replicated (e.g. 4 KV heads on 8-way tensor parallelism)."""
    out = []
    used = set()
    for name, size in zip(axes, shape):
        axis = LOGICAL_RULES.get(name)
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def param_shardings(params, logical, mesh: Mesh):
    """NamedShardings for a params pytree given its logical-axes pytree."""
    return jax.tree.map(
        lambda axes, p: NamedSharding(mesh, spec_for(axes, p.shape, mesh)),
        logical,
        params,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def place(tree, shardings):
    """Global arrays of a pytree of host arrays that every process holds
    whole (the same values), each device taking its own slice of its leaf
    (`jax.make_array_from_callback`): no transfer of the whole leaf to one
    device, and none of device_put's cross-process check that all processes
    passed the same value (one collective per leaf)."""
    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:  # already placed (hf.load_hf with the mesh)
            return x
        return jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x[idx]))

    return jax.tree_util.tree_map(one, tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: dict, mesh: Mesh, batch_axis: int = 0) -> dict:
    """Places a host-local numpy batch onto the mesh, split over the batch
    axes. With several processes each host passes its own rows."""
    out = {}
    for k, v in batch.items():
        sharding = batch_sharding(mesh, np.ndim(v), batch_axis)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sharding)
        else:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out

"""load_hf (slices read straight into the target shardings) equals the
host-stacked reference load_hf_on_host bit for bit, on 1 device and on 8
simulated devices with fsdp and tensor meshes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from focusft_jax import hf

CASES = ("llama", "qwen2_tied", "qwen3", "mistral")


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(p))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_device_equals_host_path(tiny_model_dir, case, dtype):
    src = tiny_model_dir(case)
    new = hf.load_hf(src, param_dtype=dtype, compute_dtype=dtype)
    old = hf.load_hf_on_host(src, param_dtype=dtype, compute_dtype=dtype)
    _equal(new.params, old.params)
    assert new.cfg == old.cfg


_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from focusft_jax import hf
    from focusft_jax.sharding import make_mesh, param_shardings
    from focusft_jax.model import logical_axes
    assert jax.device_count() == 8
    for src in sys.argv[1:]:
        for sizes in ((1, 8, 1), (1, 2, 4), (2, 2, 2)):
            mesh = make_mesh(*sizes)
            new = hf.load_hf(src, mesh=mesh)
            old = hf.load_hf_on_host(src)
            want = param_shardings(old.params, logical_axes(old.cfg), mesh)
            for (p, x), (_, y), (_, s) in zip(*(jax.tree_util.tree_leaves_with_path(t)
                                               for t in (new.params, old.params, want))):
                assert x.sharding == s, (p, x.sharding, s)
                assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), (src, sizes, p)
            sharded = [x for x in jax.tree.leaves(new.params) if not x.sharding.is_fully_replicated]
            assert sharded, (src, sizes)
            # the trainer's path: job.build_model with the mesh, then place() keeps those arrays as they are
            from types import SimpleNamespace
            from focusft_jax import job
            from focusft_jax.sharding import place
            cfg = SimpleNamespace(model=SimpleNamespace(path=src, numerics=lambda: {}))
            _, params, _ = job.build_model(cfg, None, mesh)
            placed = place(params, want)
            assert all(a is b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(params)))
    print("OK")
""")


def test_eight_devices_fsdp_and_tensor(tiny_model_dir):
    srcs = [str(tiny_model_dir(c)) for c in ("llama", "qwen2_tied", "qwen3")]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *srcs], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr

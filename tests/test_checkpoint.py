"""Orbax checkpoints restore onto a different mesh."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_restore_onto_a_different_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "_restore_other_mesh.py"), str(tmp_path / "ck")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert out["same_values"] and out["same_shardings_as_target"]
    assert out["gate_kernel_spec"] in ("P(None, 'fsdp', 'tensor')", "PartitionSpec(None, 'fsdp', 'tensor')")
    assert out["step"] == 5 and out["loader"] == {"epoch": 0, "step": 5}

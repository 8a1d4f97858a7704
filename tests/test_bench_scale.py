"""bench/scale.py on a toy row: the train step compiles on abstract inputs
over a simulated fsdp x tensor mesh, and XLA's memory analysis agrees with
what the shardings say one device holds (so the 7B plan's bytes mean what
the README says they mean)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from focusft_jax.model import init_params

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_row_compiles_sharded_and_its_bytes_add_up():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--grid", "tiny", "--only", "tiny sft fsdp4 x tensor2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    (row,) = doc["rows"]
    assert (row["method"], row["devices"], row["fsdp"], row["tensor"]) == ("sft", 8, 4, 2)
    state, batch = row["state_bytes_per_device"], row["batch_bytes_per_device"]
    # XLA's arguments are the state's shards, the batch's (less an input the
    # step never reads: SFT has no use for loss_mask once the loss keys are
    # there) and the step's PRNG key (a few bytes)
    assert state + batch // 2 <= row["argument_bytes"] <= state + batch + 64, row
    # the donated state is the output's storage: aliased, counted once in the peak
    assert row["alias_bytes"] >= state - 64 and row["peak_bytes"] < row["argument_bytes"] + row["temp_bytes"] + 4096
    # sharded, not replicated: one device holds well under the whole state
    # (params and two float32 moments of the toy model, 12 bytes a parameter)
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    shapes = jax.eval_shape(lambda: init_params(bench.TINY, jax.random.key(0)))
    whole_state = 12 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert whole_state / 8 <= state < whole_state / 4, (state, whole_state)
    assert row["flops_per_device"] > 0 and row["step_s_at_peak[h100_h200]"] > 0
    assert "| tiny sft fsdp4 x tensor2 | sft | 256 | 4x2 |" in res.stderr  # the Markdown table

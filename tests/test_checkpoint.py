"""Orbax checkpoints restore onto a different mesh; damaged steps are detected
and skipped on resuming."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax.checkpoint import CHECKSUM_FILE, Checkpointer, abstract_like
from focusft_jax.errors import CheckpointError

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


# Damaged checkpoints: each step carries checksums of its files; a resume
# verifies the step it restores and falls back to the newest one that verifies.
# Tiny pytrees through the Checkpointer directly (no training).

def _state(k: int) -> dict:
    return {"w": jnp.arange(4096, dtype=jnp.float32) * k, "step": jnp.asarray(k, jnp.int32)}


def _save_steps(directory, steps=(1, 2, 3), keep=3, async_save=False) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=keep, async_save=async_save)
    for k in steps:
        ckpt.save(k, _state(k), {"epoch": 0, "step": k}, force=True)
    ckpt.close()
    return ckpt


def _restore(directory):
    logs = []
    out = Checkpointer(directory, keep=3).restore_latest(abstract_like(_state(0)), logs.append)
    return out, logs


def _data_file(step_dir):
    """The largest array-data file of the step (ocdbt's d/ directory)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _garbage(step_dir):
    f = _data_file(step_dir)
    size = f.stat().st_size
    with open(f, "r+b") as fh:  # 4 KiB of garbage (or the whole file), size unchanged
        fh.seek(max(0, size // 2 - 2048))
        fh.write(np.random.default_rng(0).bytes(min(4096, size)))
    assert f.stat().st_size == size


def _truncate(step_dir):
    f = _data_file(step_dir)
    os.truncate(f, f.stat().st_size // 2)


def _empty_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")


def _empty_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_bytes(b"")


def _empty_step_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").write_bytes(b"")


def _assert_is(out, k):
    step, state, loader = out
    assert step == k and loader == {"epoch": 0, "step": k}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(k)["w"]))
    assert int(state["step"]) == k


@pytest.mark.parametrize("damage", [_garbage, _truncate, _empty_manifest, _empty_metadata, _empty_step_metadata])
def test_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, damage):
    _save_steps(tmp_path / "ck")
    damage(tmp_path / "ck" / "3")
    out, logs = _restore(tmp_path / "ck")
    _assert_is(out, 2)
    assert len(logs) == 1 and logs[0].startswith("warning:") and str(tmp_path / "ck" / "3") in logs[0], logs


def test_every_step_damaged_is_one_clear_checkpoint_error(tmp_path):
    _save_steps(tmp_path / "ck", steps=(1, 2))
    _garbage(tmp_path / "ck" / "2")
    _truncate(tmp_path / "ck" / "1")
    with pytest.raises(CheckpointError) as e:
        _restore(tmp_path / "ck")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "ck" / "2") in msg and str(tmp_path / "ck" / "1") in msg


def test_undamaged_run_restores_the_newest_step_and_keep_removes_old_checksums(tmp_path):
    _save_steps(tmp_path / "ck", steps=(1, 2, 3), keep=2, async_save=True)  # checksums written after finalizing
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2", "3"]
    assert all((tmp_path / "ck" / s / CHECKSUM_FILE).is_file() for s in ("2", "3"))
    out, logs = _restore(tmp_path / "ck")
    _assert_is(out, 3)
    assert logs == []


def test_step_without_checksums_is_skipped_unless_no_step_has_any(tmp_path):
    _save_steps(tmp_path / "ck")
    (tmp_path / "ck" / "3" / CHECKSUM_FILE).unlink()  # killed between the save and the checksum write
    out, logs = _restore(tmp_path / "ck")
    _assert_is(out, 2)
    assert len(logs) == 1 and str(tmp_path / "ck" / "3") in logs[0] and "did not complete" in logs[0]
    for s in ("1", "2"):  # a run saved by an older version: restored as before, with a warning
        (tmp_path / "ck" / s / CHECKSUM_FILE).unlink()
    out, logs = _restore(tmp_path / "ck")
    _assert_is(out, 3)
    assert len(logs) == 1 and "no checksums" in logs[0] and "unverified" in logs[0]


def test_train_main_turns_a_checkpoint_error_into_an_error_line(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("_train_script", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    def fail(cfg, log):
        raise CheckpointError("no checkpoint in /x/checkpoints verifies: /x/checkpoints/3 (broken)")

    import focusft_jax.train  # the script only calls its main, which calls this module's train

    monkeypatch.setattr(focusft_jax.train, "train", fail)
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"),
                       "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no checkpoint in /x/checkpoints verifies: /x/checkpoints/3 (broken)"]

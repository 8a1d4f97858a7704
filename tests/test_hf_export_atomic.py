"""The Hugging Face export is atomic: replacing an export drops its stale
shards, and an export that fails or is killed part way leaves the previous
one complete and loadable (issue 11, item 4). Numpy parameters of a 2-layer
toy: no compile, no torch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from focusft_jax import hf
from focusft_jax.model import ModelConfig, param_shapes

CFG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2
)
ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s).astype(np.float32), param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple)
    )


def _same(d: Path, params) -> bool:
    loaded = hf.load_hf(d).params
    return all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params))
    )


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_export_over_an_export_replaces_it_and_drops_stale_shards(tmp_path):
    out = tmp_path / "hf"
    old, new = _params(0), _params(1)
    hf.save_hf(out, CFG, old, max_shard_bytes=2_000)
    assert len(list(out.glob("model-*.safetensors"))) > 3
    (out / "merges.txt").write_text("a tokenizer file of the old export")
    (out / "notes.txt").write_text("someone else's")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    hf.save_hf(out, CFG, new)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()  # one file: no index, as save_pretrained
    assert not (out / "merges.txt").exists()  # export files are the new export's only
    assert (out / "notes.txt").read_text() == "someone else's"  # other entries are carried over
    assert (out / "eval" / "results.json").read_text() == "{}"
    assert _same(out, new)
    assert _siblings(out) == []  # no backup, no temporary directory


def test_export_into_its_own_tokenizer_directory(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    hf.save_hf(d, CFG, _params(0), tokenizer_dir=d)
    assert (d / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert _same(d, _params(0))


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    old = _params(0)
    hf.save_hf(out, CFG, old, max_shard_bytes=2_000)
    real_save = hf.write_shard
    written = []

    def dies_on_third_shard(path, tensors, arrays):
        if len(written) == 2:
            raise OSError("disk full (injected)")
        real_save(path, tensors, arrays)
        written.append(str(path))

    monkeypatch.setattr(hf, "write_shard", dies_on_third_shard)
    with pytest.raises(OSError, match="injected"):
        hf.save_hf(out, CFG, _params(1), max_shard_bytes=2_000)
    assert len(written) == 2 and all(".hf.tmp-" in p for p in written)  # it did write, elsewhere
    assert _same(out, old)
    assert _siblings(out) == []

    # A failure in the swap itself (after the old export was moved aside) puts it back.
    monkeypatch.setattr(hf, "write_shard", real_save)
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="injected"):
        hf.save_hf(out, CFG, _params(1))
    monkeypatch.setattr(hf.os, "replace", real_replace)
    assert _same(out, old)
    assert _siblings(out) == []
    new = _params(2)
    hf.save_hf(out, CFG, new)
    assert _same(out, new)


def test_leftovers_of_a_killed_export_are_restored_or_removed(tmp_path):
    out = tmp_path / "hf"
    old = _params(0)
    hf.save_hf(out, CFG, old)
    # Killed between the two renames: hf/ is missing, the previous export is the backup,
    # and the dead process's half-written directory is next to it.
    os.replace(out, tmp_path / ".hf.old")
    dead = tmp_path / ".hf.tmp-999999999"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    hf.recover_export(out)
    assert _same(out, old)
    assert _siblings(out) == []

    # Killed after the swap, before the backup was deleted: the new export stays.
    new = _params(1)
    hf.save_hf(tmp_path / "other", CFG, new)
    os.replace(out, tmp_path / ".hf.old")
    os.replace(tmp_path / "other", out)
    hf.save_hf(out, CFG, new)  # recovers first, then exports as usual
    assert _same(out, new)
    assert _siblings(out) == []

    # An incomplete backup (no weights) with hf/ missing is not a previous good export.
    (tmp_path / ".hf.old").mkdir()
    (tmp_path / ".hf.old" / "config.json").write_text("{}")
    os.replace(out, tmp_path / "gone")
    hf.recover_export(out)
    assert not out.exists() and _siblings(out) == ["gone"]


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "thesis.tex").write_text("keep me")
    with pytest.raises(hf.CheckpointError, match="neither a model export nor a tokenizer directory"):
        hf.save_hf(d, CFG, _params(0))
    assert (d / "thesis.tex").read_text() == "keep me"


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.test_hf_export_atomic import CFG, _params
    from focusft_jax import hf
    real_save, n = hf.write_shard, [0]

    def slow(path, tensors, arrays):
        real_save(path, tensors, arrays)
        n[0] += 1
        if n[0] == 2:
            Path(sys.argv[2]).write_text("mid-export")
            time.sleep(60)

    hf.write_shard = slow
    hf.save_hf(sys.argv[1], CFG, _params(1), max_shard_bytes=2_000)
    """
)


def test_sigkill_during_export_leaves_the_previous_export_loadable(tmp_path):
    out, marker = tmp_path / "hf", tmp_path / "marker"
    old = _params(0)
    hf.save_hf(out, CFG, old, max_shard_bytes=2_000)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(marker), str(ROOT)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "the exporting process exited before the kill point"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _siblings(out) == [f".hf.tmp-{proc.pid}", "marker"]  # killed mid-write, really
    assert _same(out, old)
    new = _params(2)
    hf.save_hf(out, CFG, new)  # the next export cleans the dead one's directory up
    assert _same(out, new)
    assert _siblings(out) == ["marker"]

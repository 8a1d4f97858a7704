"""TFDS datasets (array_record format) as training data, read through
`tfds.data_source` without TensorFlow. The test builds its own tiny dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from focusft_jax.data import DataError, parse_record, read_rows, resolve_source

ROOT = Path(__file__).resolve().parents[1]

CONVS = [
    [{"role": "user", "content": f"where is Mary? ({i})"}, {"role": "assistant", "content": f"in the kitchen {i} é"}]
    for i in range(12)
]


class TinyChat(tfds.core.GeneratorBasedBuilder):
    """A few chat conversations; `messages` stored as JSON text (bytes on read)."""

    VERSION = tfds.core.Version("1.0.0")
    BAD = False

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"messages": tfds.features.Text()}),
            disable_shuffling=True,  # rows in generation order, so they compare with CONVS
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "validation": self._generate_examples(1)}

    def _generate_examples(self, offset):
        for i, conv in enumerate(CONVS[offset::2]):
            msgs = [{"role": "robot", "content": "x"}] if (self.BAD and i == 3) else conv
            yield i, {"messages": json.dumps(msgs)}


class TinyBadChat(TinyChat):
    BAD = True


def _build(data_dir: Path, cls=TinyChat) -> Path:
    b = cls(data_dir=str(data_dir), file_format="array_record")
    b.download_and_prepare()
    return Path(b.data_dir)


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    return root, _build(root), _build(root, TinyBadChat)


def test_rows_equal_what_went_in_without_tensorflow(tfds_dirs, monkeypatch):
    root, ds_dir, _ = tfds_dirs
    assert resolve_source(ds_dir) == [("tfds_dir", str(ds_dir))]
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    by_dir = [parse_record(r).messages for r in read_rows(ds_dir)]
    assert by_dir == CONVS[0::2]
    assert [parse_record(r).messages for r in read_rows("tfds:tiny_chat")] == CONVS[0::2]
    assert [parse_record(r).messages for r in read_rows("tfds:tiny_chat:validation")] == CONVS[1::2]
    assert [parse_record(r).messages for r in read_rows("tfds:tiny_chat:1.0.0:validation")] == CONVS[1::2]
    assert "tensorflow" not in sys.modules


def test_errors_name_the_dataset_split_and_index(tfds_dirs, monkeypatch):
    root, ds_dir, bad_dir = tfds_dirs
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    with pytest.raises(DataError, match="tfds:no_such_set"):
        list(read_rows("tfds:no_such_set"))
    with pytest.raises(DataError, match=r"no split 'test'.*'train', 'validation'"):
        list(read_rows(ds_dir, split="test"))
    rows = list(read_rows(bad_dir))
    with pytest.raises(DataError, match=r"\[train\] index 3: message 0 has role 'robot'"):
        parse_record(rows[3])
    assert str(bad_dir) in rows[3].where
    broken = root / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{not json")
    (broken / "features.json").write_text("{}")
    with pytest.raises(DataError, match="not a readable TFDS dataset directory"):
        list(read_rows(broken))


def test_missing_tfds_is_a_data_error_naming_the_extra(tfds_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"tfds:tiny_chat.*focusft-jax\[tfds\]"):
        list(read_rows("tfds:tiny_chat"))


TINY = """
model:
  init: {family: qwen2, vocab_size: 320, hidden_size: 32, intermediate_size: 64,
         num_layers: 2, num_heads: 4, num_kv_heads: 2, tie_word_embeddings: true}
data: {max_length: 64, bucket_size: 64}
method: {rank: 4, alpha: 8, fraction: 0.35}
optim: {lr: 1.0e-2, warmup_ratio: 0.1}
train: {batch_size: 4, micro_batch_size: 2, max_steps: 2}
checkpoint: {every_steps: 2, keep: 1, async_save: false}
logging: {every_steps: 1, progress: false, tensorboard: false}
"""


def test_train_py_trains_from_tfds_name_and_directory(tfds_dirs, tmp_path):
    from focusft_jax.tokenizer import build_chat_tokenizer

    root, ds_dir, bad_dir = tfds_dirs
    tok = tmp_path / "tok"
    build_chat_tokenizer([m["content"] for c in CONVS for m in c] * 4, tok, vocab_size=300)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    env = dict(os.environ, TFDS_DATA_DIR=str(root), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device: the tiny batches need not divide over simulated ones
    summaries = []
    for name, src in (("name", "tfds:tiny_chat"), ("dir", str(ds_dir))):
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--set", f"train.output_dir={tmp_path / name}",
               "--set", f"data.train=[{src}]", "--set", f"model.tokenizer={tok}"]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        summaries.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert [s["step"] for s in summaries] == [2, 2]
    # the same rows by name and by directory: the same training
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]


def test_loader_names_or_skips_a_bad_tfds_row(tfds_dirs, tmp_path):
    from focusft_jax.data.loader import load_chat_dataset
    from focusft_jax.tokenizer import build_chat_tokenizer

    _, _, bad_dir = tfds_dirs
    tok_dir = tmp_path / "tok"
    build_chat_tokenizer([m["content"] for c in CONVS for m in c] * 4, tok_dir, vocab_size=300)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    with pytest.raises(DataError, match=r"\[train\] index 3: message 0 has role 'robot'"):
        load_chat_dataset(bad_dir, tok, max_length=64)
    ds = load_chat_dataset(bad_dir, tok, max_length=64, on_bad_row="skip")
    assert len(ds) == 5 and ds.stats.rows == 6 and ds.stats.skipped_total == 1

"""Chat data: records -> rendered text and loss spans -> tokens -> batches.

    ds = load_chat_dataset(["train.jsonl"], tokenizer, max_length=4096)
    loader = ChatLoader(ds, batch_size=8, packing=True, seed=0)
    for batch in loader:            # Batch: arrays [B, S] and loss keys [B, P]
        step(batch.arrays)          # loss_targets(batch) reads loss_index/target/weight
        ckpt["data"] = loader.state_dict()   # {"epoch", "step", "fingerprint"}

records.py reads and validates rows (JSONL, parquet, Hugging Face datasets),
render.py renders with the chat template and builds the loss mask,
batching.py truncates, buckets, packs and collates, loader.py preprocesses
once and serves deterministic, resumable, per-host batches.
"""
from focusft_jax.data.batching import (
    TRUNCATION_MODES,
    bucket_for,
    bucket_lengths,
    collate,
    max_row_predictions,
    num_predictions,
    plan_packed,
    plan_padded,
    round_loss_positions,
    truncate,
)
from focusft_jax.data.loader import Batch, ChatDataset, ChatLoader, DataStats, load_chat_dataset
from focusft_jax.data.records import (ROLES, ChatRecord, DataError, RawRow, check_sources, parse_record, read_rows,
                                     resolve_source)
from focusft_jax.data.render import (
    Rendered,
    TokenizedExample,
    render_example,
    render_spans,
    template_kwargs,
    tokenize_rendered,
)

__all__ = [
    "Batch",
    "ChatDataset",
    "ChatLoader",
    "ChatRecord",
    "DataError",
    "DataStats",
    "ROLES",
    "RawRow",
    "Rendered",
    "TRUNCATION_MODES",
    "TokenizedExample",
    "bucket_for",
    "bucket_lengths",
    "collate",
    "load_chat_dataset",
    "max_row_predictions",
    "num_predictions",
    "parse_record",
    "plan_packed",
    "plan_padded",
    "read_rows",
    "render_example",
    "render_spans",
    "resolve_source",
    "check_sources",
    "round_loss_positions",
    "template_kwargs",
    "tokenize_rendered",
    "truncate",
]

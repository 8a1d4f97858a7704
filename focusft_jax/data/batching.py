"""Truncation, length buckets, packing plans and collation into batches.

A *plan* for one batch is a list of rows; a row is a list of example indices
(one index per row without packing, several with packing, none for an empty
filler row). Collation turns a plan into arrays, all int32 [B, S]:

- input_ids: token ids, `pad_id` on padding;
- attention_mask: 1 on real tokens, 0 on padding (right padding);
- loss_mask: 1 on trained tokens (METHOD.md), 0 elsewhere and on padding;
- segment_ids: 1, 2, ... for the 1st, 2nd, ... example of the row, 0 on
  padding (without packing every real token has segment 1). Tokens attend only
  within their own segment (`focusft_jax.attention.attention_meta`), and the
  loss never predicts across segments (`focusft_jax.loss.token_weights`);
- positions: 0, 1, ... restarting at every example; 0 on padding.

S is a bucket length (`bucket_lengths`), so a training step compiles once per
bucket, not once per batch. The loader adds the scored positions of the batch
(`focusft_jax.loss.scored_positions`: loss_index, loss_target, loss_weight
[B, P]), P rounded by `round_loss_positions` for the same reason.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from focusft_jax.data.records import DataError

TRUNCATION_MODES = ("left", "right", "error")


def truncate(
    input_ids: np.ndarray, loss_mask: np.ndarray, max_length: int, mode: str, where: str = "example"
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cuts an example of n tokens to at most `max_length`.

    mode "right" keeps the first max_length tokens (the end of the
    conversation is lost), "left" keeps the last max_length (the beginning,
    including any system prompt, is lost), "error" raises `DataError`
    (reason "too_long") naming `where`. Returns (ids, loss, truncated?).
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {mode!r}")
    n = len(input_ids)
    if n <= max_length:
        return input_ids, loss_mask, False
    if mode == "error":
        raise DataError(where, f"{n} tokens after rendering; expected at most max_length={max_length} (truncation='error')", "too_long")
    if mode == "right":
        return input_ids[:max_length], loss_mask[:max_length], True
    return input_ids[n - max_length :], loss_mask[n - max_length :], True


def num_predictions(loss_mask: np.ndarray) -> int:
    """How many positions of one example are scored by the loss: targets are
    loss_mask[1:] (the first token is never predicted, see loss.token_weights)."""
    return int(np.sum(loss_mask[1:]))


def bucket_lengths(max_length: int, bucket_size: int | None = None, min_bucket: int = 16) -> tuple[int, ...]:
    """Allowed row lengths, ascending, the last one always `max_length`.

    bucket_size None: powers of two from `min_bucket` (then max_length);
    bucket_size k: k, 2k, 3k, ... (then max_length).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = []
    if bucket_size is None:
        b = 1
        while b < min(min_bucket, max_length):
            b *= 2
        while b < max_length:
            out.append(b)
            b *= 2
    else:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        out = list(range(bucket_size, max_length, bucket_size))
    out.append(max_length)
    return tuple(out)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (buckets ascending)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def round_loss_positions(count: int, seq_len: int, min_positions: int = 16) -> int:
    """P, the loss positions per row (the [B, P] shape of the loader's
    loss_index / loss_target / loss_weight) for a batch whose rows have at
    most `count` scored positions: the next power of two >=
    max(count, min_positions), capped at seq_len. Few distinct values, so a
    jitted step retraces for few batch shapes."""
    p = 1
    while p < max(count, min_positions, 1):
        p *= 2
    return int(min(p, seq_len))


def max_row_predictions(
    lengths: np.ndarray, num_predictions: np.ndarray, row_length: int, packing: bool
) -> int:
    """An upper bound of the scored positions of any row the loader can make
    from these examples: one example per row, the most any example has;
    packed rows of at most `row_length` tokens, the fractional knapsack's
    optimum (densest examples first, the last one in part), which no set of
    whole examples that fits can exceed. A fixed P of at least this holds
    every batch of every epoch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    preds = np.asarray(num_predictions, dtype=np.int64)
    if lengths.size == 0:
        return 0
    if not packing:
        return int(preds.max())
    order = np.argsort(-preds / np.maximum(lengths, 1), kind="stable")
    room, bound = row_length, 0.0
    for i in order:
        if lengths[i] <= room:
            room -= int(lengths[i])
            bound += int(preds[i])
        else:
            bound += preds[i] * room / lengths[i]
            break
    return int(min(np.ceil(bound), row_length))


def plan_padded(
    order: np.ndarray,
    lengths: np.ndarray,
    rows: int,
    *,
    drop_remainder: bool = True,
    length_grouping: int = 0,
    rng: np.random.Generator | None = None,
) -> list[list[list[int]]]:
    """One example per row, `rows` rows per batch, examples in `order`.

    length_grouping g > 0: within each window of g batches, examples are
    sorted by length before forming batches (less padding), then the batch
    order of the whole epoch is shuffled with `rng`. The examples that do not
    fill a last batch are dropped (the last ones of `order`, before grouping),
    or (drop_remainder=False) that batch is filled with empty rows.
    """
    order = [int(i) for i in order]
    if drop_remainder:  # drop before grouping, so the dropped examples are random, not the longest
        order = order[: len(order) // rows * rows]
    if length_grouping > 0:
        w = length_grouping * rows
        order = [i for c in range(0, len(order), w) for i in sorted(order[c : c + w], key=lambda j: lengths[j])]
    batches = [[[i] for i in order[c : c + rows]] for c in range(0, len(order), rows)]
    if batches and len(batches[-1]) < rows:
        batches[-1] += [[] for _ in range(rows - len(batches[-1]))]
    if length_grouping > 0 and rng is not None and batches:
        perm = rng.permutation(len(batches))
        batches = [batches[k] for k in perm]
    return batches


def plan_packed(
    order: np.ndarray,
    lengths: np.ndarray,
    row_length: int,
    rows: int,
    *,
    drop_remainder: bool = True,
    open_rows: int = 8,
) -> list[list[list[int]]]:
    """Packs examples (in `order`) into rows of at most `row_length` tokens,
    `rows` rows per batch.

    First fit over at most `open_rows` rows that are still filling: an example
    goes into the first open row with room; when none has room and all are
    open, the oldest open row is closed. Deterministic, one pass, O(n *
    open_rows). Every example lands in exactly one row (each is at most
    row_length long, see `truncate`). The last incomplete batch is dropped or
    filled with empty rows.
    """
    done: list[list[int]] = []
    open_: list[list[int]] = []
    used: list[int] = []
    for i in order:
        i = int(i)
        n = int(lengths[i])
        if n > row_length:
            raise ValueError(f"example {i} has {n} tokens > row length {row_length}")
        for k in range(len(open_)):
            if used[k] + n <= row_length:
                open_[k].append(i)
                used[k] += n
                break
        else:
            if len(open_) == max(1, open_rows):
                done.append(open_.pop(0))
                used.pop(0)
            open_.append([i])
            used.append(n)
    done.extend(open_)
    batches = [done[c : c + rows] for c in range(0, len(done), rows)]
    if batches and len(batches[-1]) < rows:
        if drop_remainder:
            batches.pop()
        else:
            batches[-1] = batches[-1] + [[] for _ in range(rows - len(batches[-1]))]
    return batches


def collate(
    plan_rows: Sequence[Sequence[int]],
    input_ids: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    seq_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Arrays (module doc) of the rows `plan_rows`, right-padded to seq_len."""
    b = len(plan_rows)
    ids = np.full((b, seq_len), pad_id, dtype=np.int32)
    att = np.zeros((b, seq_len), dtype=np.int32)
    loss = np.zeros((b, seq_len), dtype=np.int32)
    seg = np.zeros((b, seq_len), dtype=np.int32)
    pos = np.zeros((b, seq_len), dtype=np.int32)
    for r, row in enumerate(plan_rows):
        off = 0
        for s, i in enumerate(row, start=1):
            n = len(input_ids[i])
            if off + n > seq_len:
                raise ValueError(f"row {r} needs more than {seq_len} tokens")
            ids[r, off : off + n] = input_ids[i]
            loss[r, off : off + n] = loss_masks[i]
            att[r, off : off + n] = 1
            seg[r, off : off + n] = s
            pos[r, off : off + n] = np.arange(n, dtype=np.int32)
            off += n
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss, "segment_ids": seg, "positions": pos}

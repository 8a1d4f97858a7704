"""Preprocessing a chat dataset once, and the deterministic, resumable,
multi-host batch loader.

`load_chat_dataset` reads every row, validates it, renders it with the chat
template, builds the loss mask, tokenizes and truncates, all at load time
(5K examples of 4K tokens are ~160 MB of int32). `ChatLoader` then serves
batches without touching the tokenizer.

Determinism and resume. The examples of epoch e are visited in the order
`permutation(seed, e)` (numpy PCG64 seeded with [seed, e]); the batches of an
epoch (their rows, their bucket length, their number of loss positions P) are a pure
function of (dataset, loader settings, epoch). The loader's position is
therefore just `{"epoch", "step"}` (the next batch to yield) plus a
fingerprint of the dataset and settings that guards against resuming with
different data: `ChatLoader(..., state=saved)` yields exactly the batch that
would have come next, nothing repeated, nothing skipped.

Multi-host. Every host preprocesses the whole dataset (cheap next to
training, and it lets every host plan identical global batches without
communication). A global batch has `batch_size * process_count` rows; host p
materializes rows [p * batch_size, (p + 1) * batch_size). Bucket length S and
the loss positions P are decided on the global batch, so every host's arrays
have the same static shapes ([B, S], and [B, P] for the loss keys), as `jax.make_array_from_process_local_data`
needs; the state dict is the same on every host.

Rows with no loss tokens. A conversation whose loss tokens are all truncated
away (or whose only loss token is its first token, which no position
predicts) is dropped at load time and counted in `stats.no_loss_tokens`,
whatever `on_bad_row` is: it would only cost compute (the loss already
ignores such examples, never a NaN). Empty filler rows (drop_remainder=False)
have no loss tokens either and are equally harmless.
"""
from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

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
from focusft_jax.data.records import DataError, parse_record, read_rows
from focusft_jax.data.render import INCONSISTENT_TURNS, Rendered, render_spans, tokenize_rendered
from focusft_jax.loss import scored_positions

ON_BAD_ROW = ("error", "skip")


_WHERE = re.compile(r"(?s)(.*) (line|row) (\d+)")


def skipped_row(e: DataError) -> dict:
    """A skipped row's record: {file, line (JSONL) or row (other formats),
    reason, problem}; {where, reason, problem} when `where` names no row."""
    where = e.where or ""
    m = _WHERE.fullmatch(where)
    place = {"file": m.group(1), m.group(2): int(m.group(3))} if m else {"where": where or None}
    return {**place, "reason": e.reason, "problem": e.problem}


@dataclass
class DataStats:
    """What preprocessing did, for logging.

    rows: rows read; examples: examples kept; skipped: bad rows skipped, by
    reason (only with on_bad_row="skip"); skipped_where: the first messages of
    skipped rows; skipped_rows: every skipped row as {file, line | row,
    reason, problem} (`skipped_row`; train.py writes them to
    OUTPUT_DIR/skipped_rows.jsonl); truncated: kept examples that were truncated; no_loss_tokens:
    rows dropped because no loss token survived truncation; boundary_merges:
    examples where a token straddled a loss-span boundary (mask by first
    character); context_turns: assistant turns kept as context because the
    template rendered them inconsistently; tokens / loss_tokens: totals over
    kept examples.
    """

    rows: int = 0
    examples: int = 0
    skipped: dict = field(default_factory=dict)
    skipped_where: list = field(default_factory=list)
    skipped_rows: list = field(default_factory=list)
    truncated: int = 0
    no_loss_tokens: int = 0
    boundary_merges: int = 0
    context_turns: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    @property
    def skipped_total(self) -> int:
        return int(sum(self.skipped.values()))

    def summary(self) -> str:
        s = (
            f"{self.examples} examples from {self.rows} rows ({self.tokens} tokens, {self.loss_tokens} loss tokens); "
            f"skipped {self.skipped_total} bad rows {dict(self.skipped)}; {self.no_loss_tokens} rows without loss "
            f"tokens after truncation dropped; {self.truncated} truncated; {self.boundary_merges} with tokens "
            f"straddling a loss boundary; {self.context_turns} assistant turns kept as context"
        )
        return s


@dataclass
class ChatDataset:
    """Tokenized examples, in file order.

    input_ids[i], loss_mask[i]: int32 [n_i] with n_i <= max_length;
    lengths: int64 [N]; num_predictions: int64 [N] scored positions per example;
    pad_id: the id used for padding; fingerprint: hash of the token content.
    """

    input_ids: list
    loss_mask: list
    lengths: np.ndarray
    num_predictions: np.ndarray
    max_length: int
    pad_id: int
    stats: DataStats
    fingerprint: str

    def __len__(self) -> int:
        return len(self.input_ids)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def _no_examples(sources, stats: DataStats) -> str:
    """The message of a dataset left without an example, saying why."""
    names = [os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    where = f"data source{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if stats.rows == 0:
        return f"{where}: no rows (the files are empty); expected one chat row (a JSON object with 'messages') per line"
    why = []
    if stats.skipped_total:
        first = f"; the first: {stats.skipped_where[0]}" if stats.skipped_where else ""
        why.append(f"{stats.skipped_total} skipped as bad rows {dict(stats.skipped)}{first}")
    if stats.no_loss_tokens:
        why.append(f"{stats.no_loss_tokens} without loss tokens after truncation to max_length (raise data.max_length)")
    return f"{where}: no usable example among {stats.rows} rows: {'; '.join(why)}"


def load_chat_dataset(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer,
    *,
    max_length: int,
    truncation: str = "right",
    on_bad_row: str = "error",
    inconsistent_turns: str = "error",
    split: str = "train",
    messages_key: str = "messages",
    tools_key: str = "tools",
    enable_thinking_key: str = "enable_thinking",
    template_kwargs: dict | None = None,
    max_rows: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> ChatDataset:
    """Reads, validates, renders, tokenizes and truncates every row.

    sources: files, globs, directories or dataset names (see records.py).
    tokenizer: a fast `transformers` tokenizer with a chat template.
    truncation: "right" / "left" / "error" (batching.truncate).
    on_bad_row: "error" stops at the first bad row with a `DataError` naming
        the file, the row (1-based; the line for JSONL) and what was expected;
        "skip" skips it and counts it in `stats.skipped` by reason.
    inconsistent_turns: "error" / "context" (render.py).
    template_kwargs: extra `apply_chat_template` kwargs for every row (a row's
        own `tools` / `enable_thinking` override them).
    max_rows: read at most this many rows (smoke runs).
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if inconsistent_turns not in INCONSISTENT_TURNS:
        raise ValueError(f"inconsistent_turns must be one of {INCONSISTENT_TURNS}, got {inconsistent_turns!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stats = DataStats()
    ids_out: list[np.ndarray] = []
    loss_out: list[np.ndarray] = []
    digest = hashlib.blake2b(digest_size=16)

    def bad(e: DataError):
        if on_bad_row == "error":
            raise e
        stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
        if len(stats.skipped_where) < 20:
            stats.skipped_where.append(str(e))
        stats.skipped_rows.append(skipped_row(e))

    def flush(pending: list[Rendered]):
        for r, ex in zip(pending, tokenize_rendered(tokenizer, pending)):
            try:
                ids, lm, cut = truncate(ex.input_ids, ex.loss_mask, max_length, truncation, r.where)
            except DataError as e:
                bad(e)
                continue
            if num_predictions(lm) == 0:
                stats.no_loss_tokens += 1
                continue
            stats.truncated += int(cut)
            stats.boundary_merges += int(not ex.exact)
            stats.context_turns += r.context_turns
            ids_out.append(np.ascontiguousarray(ids, dtype=np.int32))
            loss_out.append(np.ascontiguousarray(lm, dtype=np.int32))
            digest.update(np.int64(len(ids)).tobytes())
            digest.update(ids_out[-1].tobytes())
            digest.update(loss_out[-1].tobytes())
        pending.clear()

    pending: list[Rendered] = []
    columns = (messages_key, tools_key, enable_thinking_key)
    for raw in read_rows(sources, split=split, columns=columns):
        if max_rows is not None and stats.rows >= max_rows:
            break
        stats.rows += 1
        try:
            rec = parse_record(raw, messages_key=messages_key, tools_key=tools_key, enable_thinking_key=enable_thinking_key)
            pending.append(
                render_spans(tokenizer, rec, extra_template_kwargs=template_kwargs, inconsistent_turns=inconsistent_turns)
            )
        except DataError as e:
            bad(e)
            continue
        if len(pending) >= 256:
            flush(pending)
    flush(pending)
    if not ids_out:
        raise DataError(_no_examples(sources, stats))
    lengths = np.asarray([len(x) for x in ids_out], dtype=np.int64)
    npred = np.asarray([num_predictions(x) for x in loss_out], dtype=np.int64)
    stats.examples = len(ids_out)
    stats.tokens = int(lengths.sum())
    stats.loss_tokens = int(sum(int(x.sum()) for x in loss_out))
    if log is not None:
        log(f"data: {stats.summary()}")
    return ChatDataset(
        input_ids=ids_out,
        loss_mask=loss_out,
        lengths=lengths,
        num_predictions=npred,
        max_length=max_length,
        pad_id=_pad_id(tokenizer),
        stats=stats,
        fingerprint=digest.hexdigest(),
    )


def global_checksum(rows: Sequence[Sequence[int]], input_ids: Sequence[np.ndarray]) -> int:
    """crc32 over a global batch: for each row, the token ids of its
    conversations in order, then a row separator (padding is not part of it)."""
    crc = 0
    for r in rows:
        for i in r:
            crc = zlib.crc32(np.ascontiguousarray(input_ids[i], dtype=np.int32).tobytes(), crc)
        crc = zlib.crc32(b"\xff\xff\xff\xff", crc)
    return crc


@dataclass(frozen=True)
class Batch:
    """One host's share of one global batch.

    arrays: int32 [B, S] input_ids, attention_mask, loss_mask, segment_ids,
        positions (batching.py); B = batch_size, S = the bucket length; and
        the scored positions (`focusft_jax.loss.scored_positions`):
        loss_index, loss_target int32 [B, P], loss_weight float32 [B, P],
        with P >= the scored positions of every row of the global batch
        (`round_loss_positions`), the same on every host. `loss_targets`
        takes them as they are.
    epoch, step: this batch's position (step = index within the epoch).
    num_examples: conversations in this host's rows.
    checksum: a fingerprint of the whole global batch's token ids, row by row
        (`global_checksum`), the same on every host and for any host count
        (logged, so that a resumed run can be checked to see the same batches).
    """

    arrays: dict
    epoch: int
    step: int
    num_examples: int
    checksum: int = 0

    @property
    def seq_len(self) -> int:
        return int(self.arrays["input_ids"].shape[1])

    @property
    def loss_positions(self) -> int:
        """P, the static number of loss positions per row (a shape of `arrays`)."""
        return int(self.arrays["loss_index"].shape[1])


class ChatLoader:
    """Deterministic, resumable iterator of `Batch`es over a `ChatDataset`.

    batch_size: rows per host per batch (global rows = batch_size * process_count).
    packing: False: one conversation per row, rows padded to the bucket of the
        longest row of the global batch; True: conversations packed into rows
        of up to max_length tokens (segment_ids / positions restart per
        conversation), padded to the bucket of the longest packed row.
    bucket_size: None: power-of-two buckets (from min_bucket) up to max_length;
        k: multiples of k up to max_length.
    pad_to: "bucket": each batch is padded to the bucket of its longest row
        and P (loss positions per row) follows its scored positions, so a run
        has a few batch shapes (one compile of the step each); "max": every
        batch is max_length long with one P that holds any row of the dataset
        (`max_row_predictions`): one shape, one compile, more padding.
    shuffle, seed: per-epoch permutation from (seed, epoch).
    drop_remainder: drop the epoch's last incomplete global batch (else fill
        it with empty rows, which carry no loss).
    length_grouping: g > 0 sorts by length within windows of g batches
        (padding mode only; less padding), batch order then shuffled.
    micro_batches: the trainer splits each host's rows into this many
        micro-batches (gradient accumulation) of consecutive rows; host p then
        holds, of global micro-batch a, its p-th part, so that a micro-batch
        holds the same rows (global rows [a*m, (a+1)*m), m = global rows per
        micro-batch) whatever the number of hosts.
    num_epochs: stop after this many epochs (None: forever).
    state: a `state_dict()` to resume from.
    """

    def __init__(
        self,
        dataset: ChatDataset,
        *,
        batch_size: int,
        packing: bool = False,
        bucket_size: int | None = None,
        min_bucket: int = 16,
        pad_to: str = "bucket",
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        length_grouping: int = 0,
        pack_open_rows: int = 8,
        min_loss_positions: int = 16,
        process_index: int = 0,
        process_count: int = 1,
        micro_batches: int = 1,
        num_epochs: int | None = None,
        state: dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if micro_batches < 1 or batch_size % micro_batches:
            raise ValueError(f"micro_batches ({micro_batches}) must divide the host's batch_size ({batch_size})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        if pad_to not in ("bucket", "max"):
            raise ValueError(f"pad_to must be 'bucket' or 'max', got {pad_to!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.packing = packing
        self.pad_to = pad_to
        self.buckets = bucket_lengths(dataset.max_length, bucket_size, min_bucket)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.length_grouping = 0 if packing else length_grouping
        self.pack_open_rows = pack_open_rows
        self.min_loss_positions = min_loss_positions
        self.process_index = process_index
        self.process_count = process_count
        self.micro_batches = micro_batches
        self.num_epochs = num_epochs
        self.global_rows = batch_size * process_count
        settings = (
            dataset.fingerprint, len(dataset), batch_size, packing, self.buckets, shuffle, seed, drop_remainder,
            self.length_grouping, pack_open_rows, min_loss_positions, process_count,
        ) + ((pad_to,) if pad_to != "bucket" else ())  # the fingerprints of earlier runs stay valid
        self.fingerprint = hashlib.blake2b(repr(settings).encode(), digest_size=12).hexdigest()
        self._plan_cache: tuple[int, list] | None = None
        self._fixed_shape: tuple[int, int] | None = None
        self.epoch = 0
        self.step = 0
        if self.steps_in_epoch(0) == 0:
            raise ValueError(
                f"{len(dataset)} examples make no complete global batch of {self.global_rows} rows "
                f"(batch_size {batch_size} x {process_count} processes); lower batch_size or set drop_remainder=False"
            )
        if state is not None:
            self.load_state_dict(state)

    # -- planning ---------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (a permutation of range(N))."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _plan(self, epoch: int) -> list:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self.epoch_order(epoch)
        ds = self.dataset
        if self.packing:
            plan = plan_packed(order, ds.lengths, ds.max_length, self.global_rows,
                               drop_remainder=self.drop_remainder, open_rows=self.pack_open_rows)
        else:
            rng = np.random.default_rng([self.seed, epoch, 1])
            plan = plan_padded(order, ds.lengths, self.global_rows, drop_remainder=self.drop_remainder,
                               length_grouping=self.length_grouping, rng=rng)
        self._plan_cache = (epoch, plan)
        return plan

    def steps_in_epoch(self, epoch: int) -> int:
        """Number of batches of `epoch` (constant without packing; with
        packing it can vary slightly between epochs)."""
        return len(self._plan(epoch))

    def total_steps(self, num_epochs: int) -> int:
        """Batches in the first `num_epochs` epochs (for LR schedules)."""
        cached = self._plan_cache
        total = sum(self.steps_in_epoch(e) for e in range(num_epochs))
        self._plan_cache = cached
        return total

    def _shape(self, rows) -> tuple[int, int]:
        ds = self.dataset
        if self.pad_to == "max":
            if self._fixed_shape is None:
                bound = max_row_predictions(ds.lengths, ds.num_predictions, ds.max_length, self.packing)
                self._fixed_shape = (ds.max_length, round_loss_positions(bound, ds.max_length, self.min_loss_positions))
            return self._fixed_shape
        longest = max((int(sum(ds.lengths[i] for i in r)) for r in rows), default=1)
        seq_len = bucket_for(max(longest, 1), self.buckets)
        preds = max((int(sum(ds.num_predictions[i] for i in r)) for r in rows), default=0)
        return seq_len, round_loss_positions(preds, seq_len, self.min_loss_positions)

    def batch_shapes(self, epoch: int) -> list[tuple[int, int]]:
        """The distinct (S, P) batch shapes of `epoch`, ascending: the step
        compiles once for each (pad_to "max": one)."""
        return sorted({self._shape(rows) for rows in self._plan(epoch)})

    def batch_at(self, epoch: int, step: int) -> Batch:
        """This host's share of global batch `step` of `epoch` (pure)."""
        plan = self._plan(epoch)
        rows = plan[step]
        ds = self.dataset
        seq_len, loss_positions = self._shape(rows)
        m = self.batch_size // self.micro_batches  # this host's rows of one micro-batch
        P, p = self.process_count, self.process_index
        mine = [rows[a * m * P + p * m + j] for a in range(self.micro_batches) for j in range(m)]
        arrays = collate(mine, ds.input_ids, ds.loss_mask, seq_len, ds.pad_id)
        # P from the global batch, so every host's loss keys have the same shape.
        arrays.update(scored_positions(arrays, loss_positions))
        return Batch(
            arrays=arrays,
            epoch=epoch,
            step=step,
            num_examples=sum(len(r) for r in mine),
            checksum=global_checksum(rows, ds.input_ids),
        )

    # -- iteration and state ----------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.step)
        self.step += 1
        if self.step >= self.steps_in_epoch(self.epoch):
            self.epoch += 1
            self.step = 0
        return batch

    def state_dict(self) -> dict:
        """The position of the next batch: {"epoch", "step", "fingerprint"}
        (JSON-serializable; the same on every host)."""
        return {"epoch": int(self.epoch), "step": int(self.step), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state` (from `state_dict()`). Raises ValueError if it
        was saved for a different dataset or loader settings, or points past
        the end of its epoch."""
        fp = state.get("fingerprint")
        if fp != self.fingerprint:
            raise ValueError(
                f"loader state was saved for a different dataset or loader settings (fingerprint {fp} != "
                f"{self.fingerprint}): resuming would not continue with exactly the next batch"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_in_epoch(epoch):
            raise ValueError(f"loader state epoch {epoch} step {step} is outside the epoch's {self.steps_in_epoch(epoch)} steps")
        self.epoch, self.step = epoch, step

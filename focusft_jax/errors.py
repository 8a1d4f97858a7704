"""The project's user-facing errors, in one place.

Each names the key, file, row or directory at fault and what was expected;
the command-line tools print it as one `error:` line and exit 2. All are
ValueErrors, so library callers can catch them as such.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


class DataError(ValueError):
    """A data problem: a training row, a data file or a benchmark's data.

    DataError(where, problem, reason) for one row or file (`where`, e.g.
    "train.jsonl line 7"; `reason` is a short key used to count skipped
    rows), or DataError(message) when the message already says where.
    """

    def __init__(self, where: str, problem: str | None = None, reason: str = "bad_row"):
        self.where = where if problem is not None else None
        self.problem = problem if problem is not None else where
        self.reason = reason
        super().__init__(where if problem is None else f"{where}: {problem}")


class TrainingDiverged(ValueError):
    """Training stopped because it cannot go on (train.max_consecutive_skipped
    steps in a row were skipped as non-finite); the message says how many,
    the likely cause and where the last good state was saved. train.py exits
    3 for it (2 is for bad input)."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be imported; the message says why."""

"""The evaluation tools' one error class.

The library's errors (ConfigError, DataError, CheckpointError) live in
`focusft_jax.errors`; `focusft_jax.evaluation.cli.run_cli` prints any of them, or an EvalError,
as one `error:` line and exits 2.
"""
from __future__ import annotations


class EvalError(ValueError):
    """A usage or data problem of an evaluation tool; the message says what and where."""


class DoesNotFit(EvalError):
    """A task's smallest sample does not fit the length: the cell is skipped
    and reported with this reason, and the run goes on."""


def check_choice(option: str, value, allowed) -> None:
    """EvalError unless `value` is one of `allowed` (the values of command-line `option`)."""
    if value not in allowed:
        raise EvalError(f"{option} must be one of {tuple(allowed)}, got {value!r}")

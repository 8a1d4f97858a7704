"""What the command-line tools (`python -m eval.babilong`, `eval.ruler`,
`eval.generate`) share: their common options, list arguments, and the one
way they report a user error (`error: ...` on stderr, exit status 2)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.runner import ATTENTION_IMPLS, PREFILL_ATTENTIONS
from focusft_jax.evaluation.tokenizing import CHAT_MODES
from focusft_jax.errors import CheckpointError, ConfigError, DataError

# Errors whose message tells the user what to fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (EvalError, DataError, ConfigError, CheckpointError)


def prog_name(clone_module: str, command: str) -> str:
    """The usage line's program: `python -m eval.X` when run from a clone (the
    entry module is a .py file), the installed console command otherwise."""
    return f"python -m {clone_module}" if sys.argv and sys.argv[0].endswith(".py") else command


def add_model_options(ap: argparse.ArgumentParser, *, checkpoint_required: bool = False) -> None:
    """--checkpoint, --prefill-attention, --attention-impl: how every tool runs a model."""
    ap.add_argument("--checkpoint", required=checkpoint_required, help="model directory (or Hugging Face hub id)")
    ap.add_argument(
        "--prefill-attention",
        default=None,
        choices=PREFILL_ATTENTIONS,
        help="how the prompt is read; default glm_bidir for a model trained from scratch with glm_bidir "
        "(its focusft.json says so), else causal (focusft_jax/evaluation/trained_defaults.py)",
    )
    ap.add_argument(
        "--attention-impl",
        default="auto",
        choices=ATTENTION_IMPLS,
        help="attention implementation of the prompt forward: auto (default) = blockwise (memory-efficient) "
        "for long prompts, dense for short ones; results are the same up to float rounding",
    )


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """--chat-template, --batch-size, --out, --no-progress: how a benchmark harness runs and where it writes."""
    ap.add_argument("--chat-template", default="auto", choices=CHAT_MODES)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--no-progress", action="store_true")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_list(text: str | None, allowed: Sequence[str] | None = None, what: str = "value") -> list[str]:
    """Comma-separated list; checks membership when `allowed` is given."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise EvalError(f"unknown {what} {bad}; choose from {list(allowed)}")
    if len(set(items)) != len(items):
        raise EvalError(f"duplicate {what} in {text!r}")
    return items


def run_cli(body: Callable[[], int]) -> int:
    """body()'s exit status; a USER_ERRORS error is printed as `error: ...` on stderr and gives 2."""
    try:
        return body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

"""Evaluation and inference command-line tools (run as `python -m eval.<tool>`)."""

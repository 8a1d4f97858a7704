"""Shared test fixtures: tiny random `transformers` models written as real
Hugging Face directories (nothing is downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

# Parity tests compare against float32 PyTorch: use full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

from tests.tiny_models import write_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(case) -> path of a saved tiny random HF model for a case
    name of `tests.tiny_models.FAMILY_CASES` (cached per session)."""
    cache = {}

    def make(case: str):
        if case not in cache:
            cache[case] = write_tiny_hf_model(case, tmp_path_factory.mktemp(case))
        return cache[case]

    return make

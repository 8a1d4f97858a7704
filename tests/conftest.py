"""Shared test fixtures: tiny random `transformers` models written as real
Hugging Face directories (nothing is downloaded)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

# Parity tests compare against float32 PyTorch: use full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

# The subprocess trainings (test_train, test_multihost, ...) compile the same
# tiny programs again and again: they share JAX's persistent compilation
# cache, fresh for each session. Set after `import jax`, so this process
# (which has read its config) does not use it; only the subprocesses do.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="focusft-jax-test-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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

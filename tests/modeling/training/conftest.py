"""Fixtures for the fine-tuning tests: the real default model's store, shared with the generation tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def model_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same persistent store as tests/modeling/generation (one GGUF conversion for both)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("concord-model-store"))
    return tmp_path_factory.mktemp("concord-model-store")

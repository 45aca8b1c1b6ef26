"""Fixtures for the generation tests: the real default model, loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the network from tests: hub ids must come from the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch is imported: idle OpenMP threads sleep instead of spinning, which on a shared
# 2-core machine is the difference between seconds and minutes per batch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modeling.generation.models import DEFAULT_MODEL_ALIAS  # noqa: E402
from modeling.generation.registry import get_generator  # noqa: E402
from modeling.generation.transformers_backend import TransformersGenerator  # noqa: E402

QUESTION = "How should our town spend this year's park budget?"
OPINIONS = [
    "The park needs more trees and shade, because the summers are getting hotter every year.",
    "Fix the broken playground equipment first; children get hurt on it every month.",
    "Add benches and lighting so that older people feel safe there in the evening.",
    "Keep the costs low; the town budget is tight and taxes should not go up.",
    "Ask the neighbours what they want before spending anything at all.",
]


@pytest.fixture(scope="session")
def model_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store that survives between runs (in .pytest_cache), so only the first run
    pays for converting the GGUF; `pytest --cache-clear` exercises the conversion again."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("concord-model-store"))
    return tmp_path_factory.mktemp("concord-model-store")


@pytest.fixture(scope="session")
def generator(model_store: Path) -> TransformersGenerator:
    # Through the registry, with the key the command test uses too: one load per session.
    loaded = get_generator("transformers", DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=model_store / "hf-cache")
    assert isinstance(loaded, TransformersGenerator)
    return loaded

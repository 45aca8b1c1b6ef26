"""The vLLM backend, where vLLM is installed (GPU workers; bench/vllm_cpu.sh checks the same on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from modeling.generation.base import GenerationRequest, SamplingParams  # noqa: E402
from modeling.generation.models import BUNDLED_MODELS, DEFAULT_MODEL_ALIAS  # noqa: E402
from modeling.generation.registry import get_generator  # noqa: E402

from .conftest import OPINIONS, QUESTION  # noqa: E402


def test_exactly_n_reproducible_candidates_with_provenance(model_store: Path) -> None:
    generator = get_generator("vllm", DEFAULT_MODEL_ALIAS, cache_dir=model_store / "hf-cache", max_model_len=2048)
    request = GenerationRequest(
        question=QUESTION, opinions=OPINIONS, n=4, seed=5, sampling=SamplingParams(max_new_tokens=32)
    )
    candidates = generator.generate(request)
    assert len(candidates) == 4
    for candidate in candidates:
        assert candidate.backend == "vllm" and candidate.text
        assert candidate.model_revision == f"sha256:{BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256}"
        positions = [candidate.prompt.index(OPINIONS[index]) for index in candidate.opinion_order]
        assert positions == sorted(positions)
        assert 1 <= candidate.completion_tokens <= 32
    assert [c.text for c in generator.generate(request)] == [c.text for c in candidates]

"""The load benchmark's stand-in generator keeps the Generator contract, and is never a default."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from modeling.generation.base import GenerationError, GenerationRequest
from modeling.generation.prompts import opinion_order
from modeling.generation.standin import BACKEND_NAME, StandInGenerator

ROOT = Path(__file__).resolve().parents[3]
OPINIONS = [
    "Taxes on the very rich should rise, because inequality erodes trust. Public services need it.",
    "Raising taxes on the rich drives investment abroad; we should cut waste instead.",
    "A modest increase on top incomes is fair if the money goes to schools.",
    "Closing loopholes matters more than the headline rate.",
]


def _request(n: int = 6, seed: int = 11) -> GenerationRequest:
    return GenerationRequest(question="Should we raise taxes on the rich?", opinions=OPINIONS, n=n, seed=seed)


def _without_latency(candidates: list) -> list[dict]:
    return [{key: value for key, value in asdict(c).items() if key != "latency_ms"} for c in candidates]


def test_returns_exactly_n_candidates_with_full_provenance() -> None:
    progress: list[tuple[int, int]] = []
    candidates = StandInGenerator().generate(_request(n=6), on_progress=lambda done, total: progress.append((done, total)))

    assert len(candidates) == 6
    assert progress[-1] == (6, 6)
    for index, candidate in enumerate(candidates):
        assert candidate.backend == BACKEND_NAME
        assert candidate.model_id and candidate.model_revision
        assert candidate.seed == 11
        # The same seeded shuffle the real backends use, one order per sample.
        assert candidate.opinion_order == opinion_order(11, index, len(OPINIONS))
        assert sorted(candidate.opinion_order) == list(range(len(OPINIONS)))
        assert "<opinion" in candidate.prompt and candidate.prompt_tokens > 0
        assert candidate.text and candidate.completion_tokens == len(candidate.text.split())
        assert candidate.latency_ms >= 0
    assert len({tuple(c.opinion_order) for c in candidates}) > 1
    assert len({c.text for c in candidates}) == 6


def test_is_deterministic_per_seed() -> None:
    generator = StandInGenerator()
    assert _without_latency(generator.generate(_request(seed=3))) == _without_latency(generator.generate(_request(seed=3)))
    assert _without_latency(generator.generate(_request(seed=3))) != _without_latency(generator.generate(_request(seed=4)))


def test_rejects_requests_no_backend_could_serve() -> None:
    with pytest.raises(GenerationError):
        StandInGenerator().generate(GenerationRequest(question="q", opinions=[], n=2, seed=0))
    with pytest.raises(GenerationError):
        StandInGenerator().generate(_request(n=0))


def test_settings_refuse_it_as_the_site_default() -> None:
    # Only an arm that names it gets it: start-up fails if the site default is set to it.
    env = {**os.environ, "CONCORD_GENERATOR_BACKEND": BACKEND_NAME, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "1"}
    check = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert check.returncode != 0
    assert "CONCORD_GENERATOR_BACKEND" in check.stderr


def test_an_arm_that_names_it_gets_it_from_the_registry() -> None:
    from modeling.generation.registry import get_generator

    generator = get_generator(BACKEND_NAME, "stand-in-v1", device="cpu", cache_dir=None)
    assert isinstance(generator, StandInGenerator) and generator.backend == BACKEND_NAME

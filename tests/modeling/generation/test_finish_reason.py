"""Candidate.finish_reason: "stop" when a statement ended at end-of-turn, "length" at the token limit."""

from __future__ import annotations

import pytest

from modeling.generation.base import FINISH_REASONS, Candidate, GenerationRequest, SamplingParams
from modeling.generation.cleaning import RawSample, build_candidates, collect_statements
from modeling.generation.openai_backend import ChatChoice, ChatResponse, OpenAIGenerator
from modeling.generation.standin import StandInGenerator
from modeling.generation.transformers_backend import TransformersGenerator

from .conftest import OPINIONS, QUESTION


def _raw(index: int, text: str, hit_token_limit: bool) -> RawSample:
    return RawSample(text, index, "prompt", [0], 10, 5, 1.0, hit_token_limit)


def test_the_default_is_stop() -> None:
    candidate = Candidate("We agree.", "x", "m", "r", "p", [0], 1, 1, 1, 1.0)
    assert candidate.finish_reason == "stop" and FINISH_REASONS == ("stop", "length")


def test_build_candidates_records_why_sampling_ended() -> None:
    samples = collect_statements(
        lambda indices: [
            _raw(index, f"We agree on point {index} here. And then the model ran out", hit_token_limit=index == 1)
            for index in indices
        ],
        2,
    )
    candidates = build_candidates(samples, backend="b", model_id="m", model_revision="r", seed=0)
    assert [candidate.finish_reason for candidate in candidates] == ["stop", "length"]
    # A cut statement keeps only its complete sentences; finish_reason still says it was cut.
    assert candidates[1].text == "We agree on point 1 here."


def test_standin_candidates_stop() -> None:
    request = GenerationRequest(question=QUESTION, opinions=OPINIONS[:3], n=2, seed=1)
    assert {candidate.finish_reason for candidate in StandInGenerator().generate(request)} == {"stop"}


def test_openai_backend_passes_the_servers_finish_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    reasons = iter(["length", "stop", "length"])

    def fake_post(self: OpenAIGenerator, payload: bytes) -> ChatResponse:
        reason = next(reasons)
        text = "We agree that the park needs shade and benches" + (" and then" if reason == "length" else ".")
        return ChatResponse([ChatChoice(text, reason)], 100, 12, "served", None, 5.0)

    monkeypatch.setattr(OpenAIGenerator, "_post", fake_post)
    generator = OpenAIGenerator("served", base_url="http://127.0.0.1:9", max_concurrency=1)
    request = GenerationRequest(question=QUESTION, opinions=["one view", "another view"], n=1, seed=3)
    (candidate,) = generator.generate(request)
    assert candidate.finish_reason == "length"


@pytest.mark.real_model
def test_transformers_backend_records_length_and_stop(generator: TransformersGenerator) -> None:
    short = GenerationRequest(
        question=QUESTION, opinions=OPINIONS[:3], n=2, seed=5, sampling=SamplingParams(max_new_tokens=10)
    )
    cut = generator.generate(short)
    assert all(candidate.finish_reason == "length" and candidate.completion_tokens == 10 for candidate in cut)
    roomy = GenerationRequest(
        question=QUESTION, opinions=OPINIONS[:3], n=2, seed=5, sampling=SamplingParams(max_new_tokens=96)
    )
    for candidate in generator.generate(roomy):
        assert candidate.finish_reason in FINISH_REASONS
        if candidate.finish_reason == "length":
            assert candidate.completion_tokens == 96
        else:  # ended at an end-of-turn token, which counts as one of its tokens
            assert candidate.completion_tokens <= 96

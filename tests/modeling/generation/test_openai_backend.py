"""The openai backend over real HTTP, against a loopback server running the real SmolLM2."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from modeling.generation.base import GenerationError, GenerationRequest, SamplingParams
from modeling.generation.openai_backend import OpenAIGenerator, chat_completions_url
from modeling.generation.transformers_backend import TransformersGenerator

from .conftest import OPINIONS, QUESTION
from .loopback_server import LoopbackServer

SHORT = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=24)


@pytest.fixture(scope="module")
def server(generator: TransformersGenerator) -> Iterator[LoopbackServer]:
    with LoopbackServer(generator) as running:
        yield running


@pytest.fixture
def loopback(server: LoopbackServer) -> LoopbackServer:
    server.reset()
    return server


def _client(server: LoopbackServer, **options: object) -> OpenAIGenerator:
    options.setdefault("backoff_s", 0.01)
    return OpenAIGenerator("smollm2-loopback", base_url=server.base_url, **options)  # type: ignore[arg-type]


def _request(n: int, opinions: list[str], seed: int = 3) -> GenerationRequest:
    return GenerationRequest(question=QUESTION, opinions=opinions, n=n, seed=seed, sampling=SHORT)


def test_real_server_real_model_exactly_n_with_provenance(loopback: LoopbackServer) -> None:
    candidates = _client(loopback).generate(_request(3, OPINIONS))
    assert len(candidates) == 3
    for candidate in candidates:
        assert candidate.backend == "openai" and candidate.model_id == "smollm2-loopback"
        # The revision is what the server reported about itself.
        assert candidate.model_revision.startswith("smollm2-loopback@fp_")
        assert candidate.text and candidate.seed == 3
        messages = json.loads(candidate.prompt)
        positions = [messages[1]["content"].index(OPINIONS[index]) for index in candidate.opinion_order]
        assert positions == sorted(positions)
        assert candidate.prompt_tokens > 100 and 1 <= candidate.completion_tokens <= SHORT.max_new_tokens
        assert candidate.latency_ms > 0
    sent = loopback.requests
    assert all(body["max_tokens"] == 24 and body["temperature"] == 0.9 and body["top_p"] == 0.95 for body in sent)
    assert all(isinstance(body["seed"], int) for body in sent)
    # Each candidate's recorded prompt is exactly what went over the wire for it, and so is its sampling seed.
    assert all(json.loads(candidate.prompt) in [body["messages"] for body in sent] for candidate in candidates)
    for candidate in candidates:
        (body,) = [body for body in sent if body["messages"] == json.loads(candidate.prompt)]
        assert candidate.sampling_seed == body["seed"] and candidate.sample_index is not None


def test_samples_sharing_a_prompt_are_one_request_with_n(loopback: LoopbackServer) -> None:
    candidates = _client(loopback).generate(_request(3, OPINIONS[:1]))
    assert len(candidates) == 3 and all(candidate.opinion_order == [0] for candidate in candidates)
    assert loopback.requests[0]["n"] == 3


def test_the_same_seed_reproduces_the_candidates(loopback: LoopbackServer) -> None:
    client = _client(loopback)
    first = [candidate.text for candidate in client.generate(_request(2, OPINIONS[:3], seed=8))]
    second = [candidate.text for candidate in client.generate(_request(2, OPINIONS[:3], seed=8))]
    assert first == second


def test_server_errors_are_retried_with_backoff(loopback: LoopbackServer) -> None:
    loopback.faults.statuses = [500, 503]
    candidates = _client(loopback, max_retries=3).generate(_request(1, OPINIONS[:1]))
    assert len(candidates) == 1 and candidates[0].text
    assert len(loopback.requests) == 3  # two injected failures, then the real answer


def test_retries_are_bounded(loopback: LoopbackServer) -> None:
    loopback.faults.statuses = [502, 502, 502, 502]
    with pytest.raises(GenerationError, match="failed after 3 attempts.*HTTP 502"):
        _client(loopback, max_retries=2).generate(_request(1, OPINIONS[:1]))
    assert len(loopback.requests) == 3


def test_client_errors_fail_at_once_with_the_servers_message(loopback: LoopbackServer) -> None:
    client = OpenAIGenerator("no-such-model", base_url=loopback.base_url, backoff_s=0.01)
    with pytest.raises(GenerationError, match="HTTP 404.*no-such-model.*does not exist"):
        client.generate(_request(1, OPINIONS[:1]))
    assert len(loopback.requests) == 1


def test_a_timed_out_request_is_retried(loopback: LoopbackServer) -> None:
    # The first answer comes too late (and would be a 500 anyway); the retry is answered by the model.
    loopback.faults.delays_s = [6.0]
    loopback.faults.statuses = [500]
    request = GenerationRequest(
        question=QUESTION, opinions=OPINIONS[:1], n=1, seed=3, sampling=SamplingParams(max_new_tokens=8)
    )
    candidates = _client(loopback, timeout_s=4.0, max_retries=1).generate(request)
    assert len(candidates) == 1
    assert len(loopback.requests) == 2


def test_persistent_timeouts_become_a_clear_error(loopback: LoopbackServer) -> None:
    loopback.faults.delays_s = [1.5, 1.5]
    loopback.faults.statuses = [500, 500]
    with pytest.raises(GenerationError, match="no response .* within 0.5s"):
        _client(loopback, timeout_s=0.5, max_retries=1).generate(_request(1, OPINIONS[:1]))


def test_an_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAIGenerator("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(GenerationError, match="cannot reach"):
        client.generate(_request(1, OPINIONS[:1]))


def test_base_urls_in_every_common_spelling() -> None:
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_a_missing_base_url_is_refused() -> None:
    with pytest.raises(GenerationError, match="CONCORD_OPENAI_BASE_URL"):
        OpenAIGenerator("m", base_url="")

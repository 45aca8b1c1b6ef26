"""The transformers backend with the real SmolLM2-135M-Instruct (small n and token budgets)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from modeling.generation.base import Candidate, GenerationError, GenerationRequest, SamplingParams
from modeling.generation.models import BUNDLED_MODELS, DEFAULT_MODEL_ALIAS
from modeling.generation.prompts import derive_seed, opinion_order
from modeling.generation.registry import BACKENDS, get_generator
from modeling.generation.transformers_backend import TransformersGenerator

from .conftest import OPINIONS, QUESTION

SHORT = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=32)


def _request(n: int = 4, seed: int = 5, opinions: list[str] = OPINIONS) -> GenerationRequest:
    return GenerationRequest(question=QUESTION, opinions=opinions, n=n, seed=seed, sampling=SHORT)


@pytest.fixture(scope="module")
def four(generator: TransformersGenerator) -> list[Candidate]:
    return generator.generate(_request())


def test_returns_exactly_n_candidates_with_full_provenance(four: list[Candidate]) -> None:
    assert len(four) == 4
    revision = f"sha256:{BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256}"
    for candidate in four:
        assert candidate.text.strip()
        assert candidate.backend == "transformers"
        assert candidate.model_id == DEFAULT_MODEL_ALIAS and candidate.model_revision == revision
        assert candidate.seed == 5
        assert sorted(candidate.opinion_order) == list(range(len(OPINIONS)))
        assert candidate.prompt.startswith("<|im_start|>system") and QUESTION in candidate.prompt
        assert candidate.prompt.endswith("<|im_start|>assistant\n")
        assert candidate.prompt_tokens > 100
        assert 1 <= candidate.completion_tokens <= SHORT.max_new_tokens
        assert candidate.latency_ms > 0


def test_each_candidates_prompt_presents_the_opinions_in_its_recorded_order(four: list[Candidate]) -> None:
    for candidate in four:
        positions = [candidate.prompt.index(OPINIONS[index]) for index in candidate.opinion_order]
        assert positions == sorted(positions)
    assert len({tuple(candidate.opinion_order) for candidate in four}) > 1


def test_first_round_orders_follow_the_seeded_shuffle(four: list[Candidate]) -> None:
    # Round 0 samples indices 0..n-1; a resampled candidate would have a later index.
    expected = [opinion_order(5, index, len(OPINIONS)) for index in range(8)]
    assert all(candidate.opinion_order in expected for candidate in four)


def test_same_request_and_seed_give_the_same_candidates(generator: TransformersGenerator, four: list[Candidate]) -> None:
    again = generator.generate(_request())
    assert [candidate.text for candidate in again] == [candidate.text for candidate in four]
    assert [candidate.opinion_order for candidate in again] == [candidate.opinion_order for candidate in four]


def test_another_seed_gives_other_candidates(generator: TransformersGenerator, four: list[Candidate]) -> None:
    other = generator.generate(_request(seed=6))
    assert [candidate.text for candidate in other] != [candidate.text for candidate in four]


def test_candidates_are_distinct(four: list[Candidate]) -> None:
    assert len({candidate.text for candidate in four}) == 4


def test_progress_is_reported_as_rows_finish_and_at_the_end(generator: TransformersGenerator) -> None:
    seen: list[tuple[int, int]] = []
    candidates = generator.generate(_request(n=3, seed=9), on_progress=lambda done, total: seen.append((done, total)))
    assert len(candidates) == 3
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})  # strictly increasing


def test_a_single_opinion_and_a_single_candidate(generator: TransformersGenerator) -> None:
    (candidate,) = generator.generate(_request(n=1, opinions=[OPINIONS[0]]))
    assert candidate.opinion_order == [0] and candidate.text


def test_each_candidate_records_its_sample_index_and_the_seed_its_batch_was_sampled_with(four: list[Candidate]) -> None:
    # What the export's candidates.sample_index and sampling_seed promise: the opinion order is the seeded
    # shuffle of (seed, sample_index), and the first batch (indices 0..n-1) shares one torch seed.
    for candidate in four:
        assert candidate.sample_index is not None
        assert candidate.opinion_order == opinion_order(5, candidate.sample_index, len(OPINIONS))
        if candidate.sample_index < 4:
            assert candidate.sampling_seed == derive_seed("transformers", 5, 0)
        else:
            assert candidate.sampling_seed not in (None, derive_seed("transformers", 5, 0))


def test_the_sequential_path_keeps_the_contract(generator: TransformersGenerator) -> None:
    candidates = generator.generate_sequential(
        GenerationRequest(question=QUESTION, opinions=OPINIONS[:3], n=2, seed=1, sampling=SamplingParams(max_new_tokens=16))
    )
    assert len(candidates) == 2 and all(candidate.completion_tokens <= 16 for candidate in candidates)
    # One by one, each row has its own seed, derived from its batch's.
    first_batch = derive_seed("transformers", 1, 0)
    assert [c.sampling_seed for c in candidates if c.sample_index is not None and c.sample_index < 2] == [
        derive_seed(first_batch, "row", c.sample_index) for c in candidates if c.sample_index is not None and c.sample_index < 2
    ]


def test_greedy_decoding_is_supported(generator: TransformersGenerator) -> None:
    request = GenerationRequest(
        question=QUESTION, opinions=OPINIONS[:2], n=1, seed=0, sampling=SamplingParams(temperature=0.0, max_new_tokens=16)
    )
    assert generator.generate(request)[0].text == generator.generate(request)[0].text


@pytest.mark.parametrize("request_", [_request(n=0), GenerationRequest(question=QUESTION, opinions=[], n=2, seed=0)])
def test_impossible_requests_are_generation_errors(generator: TransformersGenerator, request_: GenerationRequest) -> None:
    with pytest.raises(GenerationError):
        generator.generate(request_)


def test_the_registry_loads_each_model_once_per_process(generator: TransformersGenerator, model_store: Path) -> None:
    assert BACKENDS["transformers"] is TransformersGenerator
    results: list[object] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                get_generator("transformers", DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=model_store / "hf-cache")
            )
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result is generator for result in results)


def test_unknown_backends_are_rejected_with_the_known_ones_listed() -> None:
    with pytest.raises(ValueError, match="openai.*transformers.*vllm"):
        get_generator("tensorflow", DEFAULT_MODEL_ALIAS)


def test_the_vllm_backend_explains_when_vllm_is_missing() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(GenerationError, match="requirements-gpu.txt"):
            get_generator("vllm", DEFAULT_MODEL_ALIAS, device="cpu")
    else:
        pytest.skip("vLLM is installed here; tests/modeling/generation/test_vllm_backend.py covers it")


def test_sharing_the_prompt_prefix_changes_nothing_but_the_cost(generator: TransformersGenerator) -> None:
    # Prompts of different lengths, so rows are padded between the shared prefix and their own suffix.
    from modeling.generation.prompts import build_messages

    prompts = [generator.render_chat(build_messages(QUESTION, OPINIONS[:k], list(range(k)))) for k in (1, 2, 4)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    shared = generator.sample_prompts(prompts, sampling=greedy, seed=0)
    generator.share_prompt_prefix = False
    try:
        separate = generator.sample_prompts(prompts, sampling=greedy, seed=0)
    finally:
        generator.share_prompt_prefix = True
    assert [completion.text for completion in shared] == [completion.text for completion in separate]
    assert [completion.prompt_tokens for completion in shared] == [completion.prompt_tokens for completion in separate]
    assert len({completion.prompt_tokens for completion in shared}) == 3


@pytest.mark.parametrize("sharpness", [0.3, 1.0, 4.0])  # flat (needs a large k) to peaked
def test_the_fast_nucleus_keeps_exactly_the_tokens_a_full_sort_keeps(sharpness: float) -> None:
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from modeling.generation.transformers_backend import _temperature_nucleus_processor

    generator_ = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 49152, generator=generator_) * sharpness
    ids = torch.zeros(6, 1, dtype=torch.long)
    ours = _temperature_nucleus_processor(0.9, 0.95)(ids, scores)
    reference = TopPLogitsWarper(0.95)(ids, TemperatureLogitsWarper(0.9)(ids, scores.clone()))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(reference))
    assert torch.allclose(ours[torch.isfinite(ours)], reference[torch.isfinite(reference)])

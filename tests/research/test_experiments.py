"""Experiment design: seeded balanced assignment, question draws, and the three evaluation protocols."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from django.core.exceptions import ValidationError

from deliberation import selectors, services
from deliberation.mediator import load_models
from deliberation.models import (
    Arm,
    AttentionCheck,
    Candidate,
    Experiment,
    OpinionRating,
    PairwisePreference,
    PredictedAgreement,
    Presentation,
    RoomAssignment,
)
from modeling.reward.base import AgreementQuery
from tests.conftest import client_for
from tests.factories import ArmFactory, ExperimentFactory, QuestionFactory
from tests.research.study import finish_rating, mediate_with, scored_result, shown_to, write_opinions

pytestmark = pytest.mark.django_db


def _experiment_with_arms(*weights: int, seed: int = 7, **fields) -> tuple[Experiment, list[Arm]]:
    experiment = ExperimentFactory(assignment_seed=seed, group_size=3, **fields)
    experiment.arms.all().delete()
    arms = [ArmFactory(experiment=experiment, name=f"arm-{i}", weight=w) for i, w in enumerate(weights)]
    return experiment, arms


# --- Assignment --------------------------------------------------------------------------------


def test_assignment_is_balanced_within_every_block_and_recorded() -> None:
    experiment, arms = _experiment_with_arms(1, 1, 1)
    rooms = [services.room_create(experiment=experiment) for _ in range(9)]
    for block in range(3):
        assert {room.arm_id for room in rooms[block * 3 : block * 3 + 3]} == {arm.pk for arm in arms}
    for ordinal, room in enumerate(rooms):
        record = RoomAssignment.objects.get(room=room)
        assert (record.method, record.seed, record.ordinal) == ("balanced", 7, ordinal)
        assert room.arm_id in record.tied_arm_ids
        # The draw replays from the record alone.
        assert random.Random(f"{record.seed}:{record.ordinal}").choice(record.tied_arm_ids) == room.arm_id


def test_the_same_seed_gives_the_same_sequence_of_arms() -> None:
    sequences = []
    for _ in range(2):
        experiment, arms = _experiment_with_arms(1, 1, 1, seed=2024)
        names = {arm.pk: arm.name for arm in arms}
        sequences.append([names[services.room_create(experiment=experiment).arm_id] for _ in range(6)])
    assert sequences[0] == sequences[1]


def test_weights_set_each_arms_share_and_weight_zero_is_never_assigned() -> None:
    experiment, (heavy, light, opponent_only) = _experiment_with_arms(2, 1, 0)
    rooms = [services.room_create(experiment=experiment) for _ in range(9)]
    counts = Counter(room.arm_id for room in rooms)
    assert counts == {heavy.pk: 6, light.pk: 3}
    assert opponent_only.pk not in counts


def test_an_experiment_without_assignable_arms_refuses_joins() -> None:
    experiment, _ = _experiment_with_arms(0)
    with pytest.raises(services.JoinRefused, match="no conditions"):
        services.participant_join(experiment=experiment)


def test_a_researcher_chosen_arm_is_recorded_as_given() -> None:
    experiment, arms = _experiment_with_arms(1, 1)
    room = services.room_create(experiment=experiment, arm=arms[1])
    assert room.arm_id == arms[1].pk
    assert RoomAssignment.objects.get(room=room).method == "given"


def test_head_to_head_arms_are_validated() -> None:
    experiment, (first, second) = _experiment_with_arms(1, 1)
    other_experiment, (foreign,) = _experiment_with_arms(1)
    first.compare_with = foreign
    with pytest.raises(ValidationError, match="same experiment"):
        first.full_clean()
    first.compare_with, first.k_shown = second, 1
    with pytest.raises(ValidationError, match="at least 2"):
        first.full_clean()


# --- Questions ----------------------------------------------------------------------------------


def test_questions_are_drawn_from_the_bank_by_split_and_topic() -> None:
    experiment, _ = _experiment_with_arms(1, question_split="ood_test", question_topic="12")
    experiment.questions.clear()
    wanted = [QuestionFactory(split="ood_test", topic="12") for _ in range(3)]
    QuestionFactory(split="ood_test", topic="13")
    QuestionFactory(split="train", topic="12")
    rooms = [services.room_create(experiment=experiment) for _ in range(6)]
    assert Counter(room.question_id for room in rooms) == {q.pk: 2 for q in wanted}  # each once before any twice


def test_attached_questions_are_narrowed_by_split() -> None:
    experiment, _ = _experiment_with_arms(1, question_split="iid_test")
    experiment.questions.set([QuestionFactory(split="iid_test"), QuestionFactory(split="train")])
    iid = experiment.questions.get(split="iid_test")
    assert {services.room_create(experiment=experiment).question_id for _ in range(3)} == {iid.pk}


def test_no_question_matching_the_filters_refuses_joins_clearly() -> None:
    experiment, _ = _experiment_with_arms(1, question_split="nonexistent")
    with pytest.raises(services.JoinRefused, match="no questions"):
        services.participant_join(experiment=experiment)


# --- Participants never see their arm -----------------------------------------------------------------


def test_participants_never_see_their_arm_or_the_protocol() -> None:
    experiment, (arm, opponent) = _experiment_with_arms(1, 0, rate_opinions=True, attention_check=True)
    Arm.objects.filter(pk=arm.pk).update(name="SECRET-ARM-NAME", compare_with=opponent, welfare_method="rawlsian")
    Arm.objects.filter(pk=opponent.pk).update(name="HIDDEN-OPPONENT")
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    arm.refresh_from_db()
    mediate_with(round_, {arm.pk: [[5, 3, 4]] * 3, opponent.pk: [[4, 6, 2]] * 3})
    page = client_for(members[0]).get(f"/p/{members[0].code}/").content.decode()
    assert 'data-view="rating"' in page
    for secret in ("SECRET-ARM-NAME", "HIDDEN-OPPONENT", "rawlsian", "welfare", "arm"):
        assert secret not in page.replace("alarm", "")


# --- Protocol (c): exclusion ----------------------------------------------------------------------------


def test_an_exclusion_arm_leaves_one_opinion_out_silently_and_records_whose() -> None:
    experiment, (arm,) = _experiment_with_arms(1)
    Arm.objects.filter(pk=arm.pk).update(exclude_one_opinion=True)
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    first = services.mediation_claim(round_id=round_.pk)
    assert first is not None and first.excluded_participant_id in {m.pk for m in members}
    # A retried claim keeps the same excluded member.
    second = services.mediation_claim(round_id=round_.pk)
    assert second.excluded_participant_id == first.excluded_participant_id
    excluded = first.excluded_participant_id
    assert excluded not in first.participant_ids and len(first.participant_ids) == 2
    excluded_text = round_.opinions.get(participant_id=excluded).text
    assert excluded_text not in first.opinions
    assert sorted(first.rater_ids) == sorted(m.pk for m in members)
    result = scored_result(texts=["a b c d e", "f g h i j", "k l m n o", "p q r s t"], predicted=[[4, 5, 3, 2], [6, 2, 4, 4]])
    results = [services.SourcedResult(arm_id=arm.pk, result=result)]
    assert services.candidates_store(mediation=first, results=results)
    round_.refresh_from_db()
    assert round_.excluded_participant_id == excluded
    # The excluded member rates like everyone else, but the mediator never predicted their agreement.
    assert set(Presentation.objects.filter(candidate__round=round_).values_list("participant_id", flat=True)) == {m.pk for m in members}
    assert not PredictedAgreement.objects.filter(participant_id=excluded).exists()
    assert all(sorted(c.opinion_order) == sorted(first.participant_ids) for c in round_.candidates.all())


# --- Protocol (a): head-to-head -------------------------------------------------------------------------


@pytest.fixture
def head_to_head():
    experiment, (arm, opponent) = _experiment_with_arms(1, 0)
    Arm.objects.filter(pk=arm.pk).update(compare_with=opponent, k_shown=2)
    arm.refresh_from_db()
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    mediation = mediate_with(round_, {arm.pk: [[5, 3, 4, 1]] * 3, opponent.pk: [[2, 6, 3, 1]] * 3})
    return arm, opponent, members, round_, mediation


def test_head_to_head_runs_both_configurations_and_shows_one_statement_of_each(head_to_head) -> None:
    arm, opponent, members, round_, mediation = head_to_head
    assert mediation.source_arm_ids == [arm.pk, opponent.pk]
    assert mediation.seed_for(arm.pk) == round_.seed != mediation.seed_for(opponent.pk)
    candidates = list(Candidate.objects.filter(round=round_).order_by("index"))
    assert [c.index for c in candidates] == list(range(8))
    assert Counter(c.source_arm_id for c in candidates) == {arm.pk: 4, opponent.pk: 4}
    for source in (arm, opponent):
        own = [c for c in candidates if c.source_arm_id == source.pk]
        assert sorted(c.rank for c in own) == [1, 2, 3, 4]  # ranked within its source
        assert [c.rank for c in own if c.shown] == [1]
        assert {c.welfare_method for c in own} == {source.welfare_method}
    for member in members:
        assert {Candidate.objects.get(pk=c).source_arm_id for c in shown_to(member)} == {arm.pk, opponent.pk}
    round_.refresh_from_db()
    assert round_.progress_total == 8


def test_pairwise_preferences_are_validated_and_kept_once(head_to_head) -> None:
    arm, opponent, members, round_, _ = head_to_head
    participant = members[0]
    first, second = shown_to(participant)
    assert selectors.preference_pairs(participant=participant, round_=round_) == [(first, second)]
    with pytest.raises(services.InvalidInput, match="one of the two"):
        services.pairwise_preference_submit(participant=participant, candidate_a_id=first, candidate_b_id=second, preferred_id=999999)
    unshown = Candidate.objects.filter(round=round_, shown=False).first()
    with pytest.raises(services.InvalidInput, match="not one of yours"):
        services.pairwise_preference_submit(participant=participant, candidate_a_id=first, candidate_b_id=unshown.pk, preferred_id=first)
    services.pairwise_preference_submit(participant=participant, candidate_a_id=second, candidate_b_id=first, preferred_id=second)
    services.pairwise_preference_submit(participant=participant, candidate_a_id=first, candidate_b_id=second, preferred_id=first)
    preference = PairwisePreference.objects.get(participant=participant)
    assert (preference.candidate_a_id, preference.candidate_b_id) == tuple(sorted((first, second)))
    assert preference.preferred_id == first


def test_the_ranking_waits_for_the_preference(head_to_head) -> None:
    _, _, members, round_, _ = head_to_head
    participant = members[0]
    for candidate_id in shown_to(participant):
        services.rating_submit(participant=participant, candidate_id=candidate_id, agreement=4, quality=4)
    with pytest.raises(services.InvalidInput, match="prefer in every pair"):
        services.ranking_submit(participant=participant, positions={c: i + 1 for i, c in enumerate(shown_to(participant))})
    page = client_for(participant).get(f"/p/{participant.code}/").content.decode()
    assert "Which statement do you prefer?" in page and 'name="rank_' not in page


def test_a_preference_over_http_reaches_the_service(head_to_head) -> None:
    _, _, members, _, _ = head_to_head
    participant = members[1]
    first, second = shown_to(participant)
    response = client_for(participant).post(
        f"/p/{participant.code}/prefer/", {"candidate_a": first, "candidate_b": second, "preferred": second}
    )
    assert response.status_code == 302
    assert PairwisePreference.objects.get(participant=participant).preferred_id == second
    bad = client_for(participant).post(f"/p/{participant.code}/prefer/", {"candidate_a": "x", "candidate_b": second, "preferred": second})
    assert bad.status_code == 400


# --- Protocol (b): members' opinions, and attention checks ----------------------------------------------------


@pytest.fixture
def rated_opinions_round():
    experiment, (arm,) = _experiment_with_arms(1, rate_opinions=True, attention_check=True)
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    mediate_with(round_, {arm.pk: [[5, 3, 4, 1], [2, 6, 3, 1], [4, 4, 4, 4]]})
    return members, round_


def test_each_member_rates_the_others_opinions_but_not_their_own(rated_opinions_round) -> None:
    members, round_ = rated_opinions_round
    participant = members[0]
    to_rate = selectors.opinions_to_rate(participant=participant, round_=round_)
    assert sorted(o.participant_id for o in to_rate) == sorted(m.pk for m in members[1:])
    own = round_.opinions.get(participant=participant)
    with pytest.raises(services.InvalidInput, match="not one of yours"):
        services.opinion_rating_submit(participant=participant, opinion_id=own.pk, agreement=7)
    with pytest.raises(services.InvalidInput, match="between 1 and 7"):
        services.opinion_rating_submit(participant=participant, opinion_id=to_rate[0].pk, agreement=9)
    services.opinion_rating_submit(participant=participant, opinion_id=to_rate[0].pk, agreement=2)
    services.opinion_rating_submit(participant=participant, opinion_id=to_rate[0].pk, agreement=3)
    assert list(OpinionRating.objects.filter(participant=participant).values_list("agreement", flat=True)) == [3]
    page = client_for(participant).get(f"/p/{participant.code}/").content.decode()
    assert "Other members&#x27; opinions" in page or "Other members' opinions" in page
    assert own.text not in page.split("other-opinions", 1)[1]
    for member in members:  # authors are not named next to their opinions
        assert member.label not in page.split("other-opinions", 1)[1].split("</div>", 1)[0]


def test_the_attention_check_records_a_failure_that_a_second_answer_cannot_undo(rated_opinions_round) -> None:
    members, round_ = rated_opinions_round
    participant = members[0]
    expected = selectors.attention_expected(participant=participant, round_=round_)
    assert expected != 4
    wrong = 1 if expected != 1 else 7
    assert services.attention_check_submit(participant=participant, answer=wrong).passed is False
    assert services.attention_check_submit(participant=participant, answer=expected).passed is False
    assert AttentionCheck.objects.get(participant=participant).answer == wrong


def test_the_ranking_waits_for_opinion_ratings_and_the_attention_item(rated_opinions_round) -> None:
    members, round_ = rated_opinions_round
    participant = members[0]
    shown = shown_to(participant)
    for candidate_id in shown:
        services.rating_submit(participant=participant, candidate_id=candidate_id, agreement=5, quality=5)
    with pytest.raises(services.InvalidInput, match="other member's opinion"):
        services.ranking_submit(participant=participant, positions={c: i + 1 for i, c in enumerate(shown)})
    for opinion in selectors.opinions_to_rate(participant=participant, round_=round_):
        services.opinion_rating_submit(participant=participant, opinion_id=opinion.pk, agreement=4)
    with pytest.raises(services.InvalidInput, match="answer every question"):
        services.ranking_submit(participant=participant, positions={c: i + 1 for i, c in enumerate(shown)})
    finish_rating(participant, {c: 5 for c in shown})
    participant.refresh_from_db()
    assert participant.finished_at is not None
    state = selectors.room_state_for(participant)
    assert state.view == "done"


# --- Reward model "none": the baseline arm --------------------------------------------------------


def test_an_arm_without_a_reward_model_shows_the_first_statements_written() -> None:
    experiment, (arm,) = _experiment_with_arms(1)
    Arm.objects.filter(pk=arm.pk).update(reward_model="none", welfare_method="rawlsian")
    arm.refresh_from_db()
    _, reward_model = load_models(arm=arm)
    assert reward_model.name == "none"
    queries = [AgreementQuery(question="Q?", opinion="o", statement=f"s{i}") for i in range(5)]
    assert reward_model.predict(queries) == [4.0] * 5
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    mediation = services.mediation_claim(round_id=round_.pk)
    flat = reward_model.predict(queries[:4] * 3)
    result = scored_result(texts=["w", "x", "y", "z"], predicted=[flat[p * 4 : (p + 1) * 4] for p in range(3)], welfare_method=arm.welfare_method)
    result.reward_model, result.reward_model_version = reward_model.name, reward_model.version
    services.candidates_store(mediation=mediation, results=[services.SourcedResult(arm_id=arm.pk, result=result)])
    candidates = list(Candidate.objects.filter(round=round_).order_by("index"))
    assert [c.rank for c in candidates] == [1, 2, 3, 4]
    assert [c.shown for c in candidates] == [True, True, False, False]  # K = 2: the first two written
    assert set(PredictedAgreement.objects.filter(candidate__round=round_).values_list("reward_model", flat=True)) == {"none"}

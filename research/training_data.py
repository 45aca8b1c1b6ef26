"""Selectors for the flywheel: a study's rated statements and preference votes, read from the database.

modeling.training.study_data filters them and shapes the rows; build_sft_dataset,
build_preference_dataset and the researcher's training runs (research.training) call
`sft_dataset` and `preference_dataset` here.

A statement's opinions are those that went into its generation, as mediation chose them: the
round's opinions in participant order, without the member an exclusion arm left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations

from django.db.models import QuerySet

from deliberation.models import Candidate, Experiment, Opinion, PairwisePreference, Ranking, Rating
from modeling.training.study_data import (
    DEFAULT_MIN_QUALITY,
    HELD_OUT_SPLITS,
    DatasetBuild,
    PreferenceVote,
    StudyStatement,
    preference_rows,
    sft_rows,
)


def _candidates(experiments: Sequence[Experiment] | None) -> QuerySet[Candidate]:
    candidates = Candidate.objects.select_related("round__room__question", "round__room__experiment")
    if experiments is not None:
        candidates = candidates.filter(round__room__experiment__in=list(experiments))
    return candidates.order_by("id")


def _statements(candidates: QuerySet[Candidate]) -> dict[int, StudyStatement]:
    rows = list(candidates)
    round_ids = {c.round_id for c in rows}
    excluded = {c.round_id: c.round.excluded_participant_id for c in rows}
    opinions: dict[int, list[str]] = defaultdict(list)
    for round_id, participant_id, text in (
        Opinion.objects.filter(round_id__in=round_ids).order_by("participant_id", "id").values_list("round_id", "participant_id", "text")
    ):
        if participant_id != excluded[round_id]:
            opinions[round_id].append(text)
    ratings: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for candidate_id, participant_id, agreement, quality in (
        Rating.objects.filter(candidate__in=[c.pk for c in rows])
        .order_by("id")
        .values_list("candidate_id", "participant_id", "agreement", "quality")
    ):
        ratings[candidate_id].append((participant_id, agreement, quality))
    statements = {}
    for candidate in rows:
        room = candidate.round.room
        if not opinions[candidate.round_id]:
            continue  # nothing to condition on
        statements[candidate.pk] = StudyStatement(
            candidate_id=candidate.pk,
            round_id=candidate.round_id,
            experiment=room.experiment.slug,
            question=room.question.text,
            question_id=room.question.external_id,
            split=room.question.split,
            opinions=tuple(opinions[candidate.round_id]),
            statement=candidate.text,
            ratings=tuple(ratings[candidate.pk]),
        )
    return statements


def study_statements(*, experiments: Sequence[Experiment] | None = None) -> list[StudyStatement]:
    """Every generated statement of `experiments` (all, if None), with its context and ratings."""
    return list(_statements(_candidates(experiments)).values())


def preference_votes(*, experiments: Sequence[Experiment] | None = None) -> list[PreferenceVote]:
    """One vote per ordered pair of each ranking, and one per head-to-head preference."""
    rankings = Ranking.objects.order_by("id")
    preferences = PairwisePreference.objects.order_by("id")
    if experiments is not None:
        rankings = rankings.filter(round__room__experiment__in=list(experiments))
        preferences = preferences.filter(round__room__experiment__in=list(experiments))
    votes: list[PreferenceVote] = []
    for round_id, order in rankings.values_list("round_id", "order"):
        # order is best first: every earlier statement beats every later one.
        votes.extend(PreferenceVote(round_id, int(winner), int(loser), "ranking") for winner, loser in combinations(order, 2))
    for round_id, a, b, preferred in preferences.values_list("round_id", "candidate_a_id", "candidate_b_id", "preferred_id"):
        votes.append(PreferenceVote(round_id, preferred, b if preferred == a else a, "head-to-head"))
    return votes


def sft_dataset(
    *,
    experiments: Sequence[Experiment] | None = None,
    min_quality: float = DEFAULT_MIN_QUALITY,
    min_agreement: float | None = None,
    welfare: str | None = None,
) -> DatasetBuild:
    """SFT rows from the statements of `experiments` groups rated highly (raises NothingKept)."""
    return sft_rows(study_statements(experiments=experiments), min_quality=min_quality, min_agreement=min_agreement, welfare=welfare)


def preference_dataset(*, experiments: Sequence[Experiment] | None = None, min_margin: int = 1) -> DatasetBuild:
    """Chosen/rejected pairs from the rankings and head-to-head preferences of `experiments` (raises NothingKept)."""
    votes = preference_votes(experiments=experiments)
    ids = {v.winner_id for v in votes} | {v.loser_id for v in votes}
    statements = _statements(_candidates(experiments).filter(pk__in=ids))
    return preference_rows(statements, votes, min_margin=min_margin)


def reward_rows(*, experiments: Sequence[Experiment]) -> list[dict[str, object]]:
    """The reward model's training rows (train_reward_model --data's format): one per rating, with the
    rater's own opinion in that round; questions of the held-out splits left out."""
    ratings = (
        Rating.objects.filter(candidate__round__room__experiment__in=list(experiments))
        .exclude(candidate__round__room__question__split__in=sorted(HELD_OUT_SPLITS))
        .select_related("candidate__round__room__question")
        .order_by("id")
    )
    rows = list(ratings)
    own = {
        (round_id, participant_id): text
        for round_id, participant_id, text in Opinion.objects.filter(round_id__in={r.candidate.round_id for r in rows}).values_list(
            "round_id", "participant_id", "text"
        )
    }
    out: list[dict[str, object]] = []
    for rating in rows:
        opinion = own.get((rating.candidate.round_id, rating.participant_id))
        if opinion:
            out.append(
                {
                    "group_id": rating.candidate.round.room_id,
                    "participant_id": rating.participant_id,
                    "question": rating.candidate.round.room.question.text,
                    "opinion": opinion,
                    "statement": rating.candidate.text,
                    "agreement": rating.agreement,
                }
            )
    return out

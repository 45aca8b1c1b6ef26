"""The rating phase: agreement and quality ratings, the final ranking, and the evaluation protocols."""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.utils import timezone

from modeling.likert import LIKERT_MAX, LIKERT_MIN, parse_likert

from .. import events, selectors
from ..models import AttentionCheck, OpinionRating, PairwisePreference, Participant, Presentation, Ranking, Rating, Round
from .errors import InvalidInput, WrongPhase
from .phases import round_finish


def _parse_likert(value: object, *, what: str) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        raise InvalidInput(f"Please choose your {what} on the {LIKERT_MIN}–{LIKERT_MAX} scale.") from None
    if parse_likert(number) is None:
        raise InvalidInput(f"Your {what} must be between {LIKERT_MIN} and {LIKERT_MAX}.")
    return number


def _rating_round(*, participant: Participant) -> Round:
    round_ = Round.objects.select_for_update().current(room_id=participant.room_id)
    if not round_.accepts_ratings():
        raise WrongPhase("Statements can only be rated while the rating phase is open.")
    if participant.has_finished:
        raise WrongPhase("You have already submitted your ranking.")
    if participant.has_left:
        raise WrongPhase("You were marked as having left this discussion.")
    if Ranking.objects.filter(participant=participant, round=round_).exists():
        raise WrongPhase("You have already submitted your ranking.")
    return round_


def rating_submit(*, participant: Participant, candidate_id: int, agreement: object, quality: object) -> Rating:
    agreement_value = _parse_likert(agreement, what="agreement")
    quality_value = _parse_likert(quality, what="quality rating")
    with transaction.atomic():
        # Locking the participant serialises two tabs of the same person.
        participant = Participant.objects.select_for_update().get(pk=participant.pk)
        round_ = _rating_round(participant=participant)
        if not Presentation.objects.filter(participant=participant, candidate_id=candidate_id, candidate__round=round_).exists():
            raise InvalidInput("That statement is not one of yours to rate.")
        try:
            with transaction.atomic():
                rating, _ = Rating.objects.update_or_create(
                    participant=participant,
                    candidate_id=candidate_id,
                    defaults={"agreement": agreement_value, "quality": quality_value},
                )
        except IntegrityError:
            # Another process won the race: the unique constraint keeps one row; update it.
            rating = Rating.objects.get(participant=participant, candidate_id=candidate_id)
            rating.agreement, rating.quality = agreement_value, quality_value
            rating.save(update_fields=["agreement", "quality"])
        events.send_on_commit(
            events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk)
        )
    return rating


def ranking_submit(*, participant: Participant, positions: dict[int, object]) -> Ranking:
    """`positions` maps each presented candidate id to the participant's rank for it (1 = best)."""
    with transaction.atomic():
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment").get(pk=participant.pk)
        # One ranking per member and round: a double submit (or a late second tab) gets the first one back.
        current = Round.objects.current(room_id=participant.room_id)
        existing = Ranking.objects.filter(participant=participant, round=current).first()
        if existing is not None:
            return existing
        round_ = _rating_round(participant=participant)
        presented = list(
            Presentation.objects.filter(participant=participant, candidate__round=round_).values_list("candidate_id", flat=True)
        )
        if set(positions) != set(presented):
            raise InvalidInput("Please rank every statement shown to you, and only those.")
        ranks: dict[int, int] = {}
        for candidate_id, value in positions.items():
            try:
                ranks[candidate_id] = int(str(value))
            except (TypeError, ValueError):
                raise InvalidInput("Please give every statement a rank.") from None
        if sorted(ranks.values()) != list(range(1, len(presented) + 1)):
            raise InvalidInput(f"Please use each rank from 1 to {len(presented)} exactly once.")
        rated = set(Rating.objects.filter(participant=participant, candidate_id__in=presented).values_list("candidate_id", flat=True))
        if rated != set(presented):
            raise InvalidInput("Please rate every statement before ranking them.")
        _check_protocol_items_done(participant=participant, round_=round_)
        order = sorted(ranks, key=lambda candidate_id: ranks[candidate_id])
        ranking = Ranking.objects.create(participant=participant, round=round_, order=order)
        experiment = participant.room.experiment
        # The member is finished unless more is asked after this round: a critique round, or (after the last
        # round) the closing questions (the final preference, the position after; services/protocol.py).
        if round_.is_last(critique_rounds=experiment.critique_rounds) and not experiment.ask_positions and not round_.is_critique():
            participant.finished_at = timezone.now()
            participant.save(update_fields=["finished_at"])
        events.send_on_commit(events.ParticipantFinished(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
        raters = round_.rater_ids() - round_.ranked_ids()
        still_rating = Participant.objects.filter(pk__in=raters, dropped_out_at__isnull=True).exists()
        if not still_rating:
            round_finish(round_=round_, outcome=Round.Outcome.COMPLETED)
    return ranking


# --- Evaluation protocols in the rating phase ------------------------------------------


def _check_protocol_items_done(*, participant: Participant, round_: Round) -> None:
    """Before the final ranking: every pairwise preference, opinion rating and attention item asked for."""
    todo = selectors.protocol_todo(participant=participant, round_=round_)
    if todo.preference_pairs:
        raise InvalidInput("Please say which statement you prefer in every pair before ranking.")
    if todo.opinion_ids:
        raise InvalidInput("Please rate every other member's opinion before ranking.")
    if todo.attention_check:
        raise InvalidInput("Please answer every question on this page before ranking.")


def pairwise_preference_submit(*, participant: Participant, candidate_a_id: int, candidate_b_id: int, preferred_id: object) -> PairwisePreference:
    """Head-to-head: the participant prefers `preferred_id`, one of a pair of shown statements from different arms."""
    try:
        preferred = int(str(preferred_id))
    except (TypeError, ValueError):
        raise InvalidInput("Please choose one of the two statements.") from None
    low, high = sorted((int(candidate_a_id), int(candidate_b_id)))
    if preferred not in (low, high):
        raise InvalidInput("Please choose one of the two statements.")
    with transaction.atomic():
        participant = Participant.objects.select_for_update().get(pk=participant.pk)
        round_ = _rating_round(participant=participant)
        pairs = selectors.preference_pairs(participant=participant, round_=round_)
        if (low, high) not in {tuple(sorted(pair)) for pair in pairs}:
            raise InvalidInput("That pair of statements is not one of yours to compare.")
        preference, _ = PairwisePreference.objects.update_or_create(
            participant=participant, candidate_a_id=low, candidate_b_id=high,
            defaults={"round": round_, "preferred_id": preferred},
        )
        events.send_on_commit(events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
    return preference


def opinion_rating_submit(*, participant: Participant, opinion_id: int, agreement: object) -> OpinionRating:
    """Best-human-opinion protocol: agreement with another member's anonymised opinion."""
    value = _parse_likert(agreement, what="agreement")
    with transaction.atomic():
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment").get(pk=participant.pk)
        round_ = _rating_round(participant=participant)
        if not participant.room.experiment.rate_opinions:
            raise InvalidInput("This study does not ask you to rate opinions.")
        if opinion_id not in {o.pk for o in selectors.opinions_to_rate(participant=participant, round_=round_)}:
            raise InvalidInput("That opinion is not one of yours to rate.")
        rating, _ = OpinionRating.objects.update_or_create(participant=participant, opinion_id=opinion_id, defaults={"agreement": value})
        events.send_on_commit(events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
    return rating


def attention_check_submit(*, participant: Participant, answer: object) -> AttentionCheck:
    """An instructed-response item. The first answer counts: a second one cannot turn a failure into a pass."""
    value = _parse_likert(answer, what="answer")
    with transaction.atomic():
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment").get(pk=participant.pk)
        round_ = _rating_round(participant=participant)
        if not participant.room.experiment.attention_check:
            raise InvalidInput("This study has no such question.")
        existing = AttentionCheck.objects.filter(participant=participant, round=round_).first()
        if existing is not None:
            return existing
        expected = selectors.attention_expected(participant=participant, round_=round_)
        check = AttentionCheck.objects.create(participant=participant, round=round_, expected=expected, answer=value, passed=value == expected)
        events.send_on_commit(events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
    return check

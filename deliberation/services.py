"""Every write to deliberation state goes through these functions.

Each runs inside transaction.atomic, takes keyword-only arguments, locks the
rows it moves between phases (select_for_update), and sends its events and
enqueues its tasks only after commit.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Sequence

from django.db import IntegrityError, transaction
from django.db.models import Count, F
from django.utils import timezone

from . import events
from .models import (
    Arm,
    Candidate,
    Experiment,
    Opinion,
    Participant,
    PredictedAgreement,
    Presentation,
    Question,
    Ranking,
    Rating,
    Room,
    Round,
)

if TYPE_CHECKING:
    from modeling.pipeline import MediationResult

# Enough to show a stable alphabet of anonymous names in a room of up to 8.
PARTICIPANT_LABELS = ["A", "B", "C", "D", "E", "F", "G", "H"]
MIN_OPINIONS_FOR_MEDIATION = 2


class ServiceError(Exception):
    """A request that cannot be carried out; the message is shown to the person who made it."""


class JoinRefused(ServiceError):
    pass


class WrongPhase(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


# --- Joining ---------------------------------------------------------------------


def _choose_arm(*, experiment: Experiment) -> Arm:
    """Balanced assignment: the arm with the fewest rooms so far, ties broken by a seeded draw."""
    arms = list(experiment.arms.annotate(room_count=Count("rooms")).order_by("id"))
    if not arms:
        raise JoinRefused("This study is not set up yet: it has no conditions.")
    fewest = min(arm.room_count / max(arm.weight, 1) for arm in arms)
    tied = [arm for arm in arms if arm.room_count / max(arm.weight, 1) == fewest]
    rooms_so_far = experiment.rooms.count()
    rng = random.Random(f"{experiment.assignment_seed}:{rooms_so_far}")
    return rng.choice(tied)


def _choose_question(*, experiment: Experiment) -> Question:
    questions = list(experiment.questions.order_by("id"))
    if not questions:
        raise JoinRefused("This study is not set up yet: it has no questions.")
    # Rotate through the experiment's questions so each is discussed by some group.
    return questions[experiment.rooms.count() % len(questions)]


def room_create(*, experiment: Experiment, arm: Arm | None = None, question: Question | None = None) -> Room:
    with transaction.atomic():
        room = Room.objects.create(
            experiment=experiment,
            arm=arm or _choose_arm(experiment=experiment),
            question=question or _choose_question(experiment=experiment),
            capacity=experiment.group_size,
        )
        Round.objects.create(room=room, index=0, seed=random.Random(f"{experiment.assignment_seed}:{room.pk}").getrandbits(31))
    return room


def _add_participant(*, room: Room, external_id: str) -> Participant:
    taken = set(room.participants.values_list("label", flat=True))
    label = next(f"Participant {letter}" for letter in PARTICIPANT_LABELS if f"Participant {letter}" not in taken)
    now = timezone.now()
    participant = Participant.objects.create(room=room, label=label, external_id=external_id, consented_at=now)
    events.send_on_commit(events.ParticipantJoined(room_id=room.pk, participant_id=participant.pk))
    if room.participants.count() >= room.capacity:
        _round_open_opinions(round_=room.rounds.select_for_update().get(index=0))
    return participant


def participant_join(*, experiment: Experiment, external_id: str = "", room: Room | None = None) -> Participant:
    """Consent and join: into `room` if given (an invite to one room), else the forming room.

    A known external id (Prolific PID, participant_label) resumes that participant.
    """
    external_id = external_id.strip()[:200]
    with transaction.atomic():
        # Serialise joins per experiment, so two arrivals cannot both take the last seat.
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        if external_id:
            existing = (
                Participant.objects.filter(room__experiment=experiment, external_id=external_id)
                .order_by("-id")
                .first()
            )
            if existing is not None:
                return existing
        if experiment.status != Experiment.Status.ACTIVE:
            raise JoinRefused("This study is not accepting participants right now.")
        if room is not None:
            room = Room.objects.select_for_update().get(pk=room.pk)
            if room.experiment_id != experiment.pk:
                raise JoinRefused("This invitation does not belong to this study.")
            if room.status != Room.Status.OPEN:
                raise JoinRefused("This room is closed: its discussion has already started or ended.")
            if room.participants.count() >= room.capacity:
                raise JoinRefused("This room is full.")
            return _add_participant(room=room, external_id=external_id)
        # The experiment lock above already serialises joins, so no room lock is needed here
        # (and PostgreSQL refuses FOR UPDATE with GROUP BY).
        forming = (
            experiment.rooms.filter(status=Room.Status.OPEN)
            .annotate(size=Count("participants"))
            .filter(size__lt=F("capacity"))
            .order_by("id")
            .first()
        )
        if forming is None:
            forming = room_create(experiment=experiment)
        return _add_participant(room=forming, external_id=external_id)


# --- Presence --------------------------------------------------------------------


def presence_connect(*, participant_id: int) -> None:
    with transaction.atomic():
        Participant.objects.filter(pk=participant_id).update(connections=F("connections") + 1, last_seen_at=timezone.now())
        room_id = Participant.objects.values_list("room_id", flat=True).get(pk=participant_id)
        events.send_on_commit(events.PresenceChanged(room_id=room_id))


def presence_disconnect(*, participant_id: int) -> None:
    with transaction.atomic():
        Participant.objects.filter(pk=participant_id, connections__gt=0).update(
            connections=F("connections") - 1, last_seen_at=timezone.now()
        )
        room_id = Participant.objects.values_list("room_id", flat=True).get(pk=participant_id)
        events.send_on_commit(events.PresenceChanged(room_id=room_id))


# --- Phases ----------------------------------------------------------------------


def _set_phase(*, round_: Round, phase: str, deadline_seconds: int | None) -> None:
    now = timezone.now()
    round_.phase = phase
    round_.phase_deadline = now + timedelta(seconds=deadline_seconds) if deadline_seconds else None
    round_.save()
    events.send_on_commit(events.PhaseChanged(room_id=round_.room_id, round_id=round_.pk, phase=phase))
    if deadline_seconds:
        _schedule_deadline(round_id=round_.pk, phase=phase, seconds=deadline_seconds)


def _schedule_deadline(*, round_id: int, phase: str, seconds: float) -> None:
    from .dispatch import enqueue
    from .tasks import round_deadline

    # A little slack, so the task never fires before the deadline it checks.
    transaction.on_commit(lambda: enqueue(round_deadline, args=[round_id, phase], countdown=seconds + 0.5))


def _round_open_opinions(*, round_: Round) -> None:
    if round_.phase != Round.Phase.WAITING:
        return
    room = Room.objects.select_for_update().get(pk=round_.room_id)
    room.status = Room.Status.RUNNING
    room.started_at = timezone.now()
    room.save(update_fields=["status", "started_at"])
    round_.opinions_started_at = timezone.now()
    _set_phase(round_=round_, phase=Round.Phase.OPINIONS, deadline_seconds=room.experiment.opinion_seconds)


def round_start(*, room: Room) -> Round:
    """Start the opinion phase before the group is full (a researcher's decision)."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(room=room, index=0)
        if round_.phase != Round.Phase.WAITING:
            raise WrongPhase("This round has already started.")
        joined = room.participants.count()
        if joined < MIN_OPINIONS_FOR_MEDIATION:
            raise InvalidInput(f"At least {MIN_OPINIONS_FOR_MEDIATION} participants must join first ({joined} so far).")
        _round_open_opinions(round_=round_)
    return round_


def _active_participants(round_: Round) -> Sequence[Participant]:
    return list(round_.room.participants.filter(dropped_out_at__isnull=True).order_by("id"))


def _begin_mediation(*, round_: Round) -> None:
    from .dispatch import enqueue
    from .tasks import mediate_round

    round_.mediation_started_at = timezone.now()
    round_.progress_stage = "queued"
    round_.progress_done = 0
    round_.progress_total = round_.room.arm.n_candidates
    _set_phase(round_=round_, phase=Round.Phase.MEDIATING, deadline_seconds=None)
    round_id = round_.pk
    transaction.on_commit(lambda: enqueue(mediate_round, args=[round_id]))


def _drop_out(*, participants: Sequence[Participant], reason: str) -> None:
    now = timezone.now()
    for participant in participants:
        participant.dropped_out_at = now
        participant.dropout_reason = reason
        participant.save(update_fields=["dropped_out_at", "dropout_reason"])


def opinion_save_draft(*, participant: Participant, text: str) -> None:
    """Keep what a participant has typed, so a reload or a lost connection loses nothing."""
    limit = participant.room.experiment.opinion_max_chars
    Participant.objects.filter(pk=participant.pk).update(opinion_draft=text[: limit * 2])


def opinion_submit(*, participant: Participant, text: str) -> Opinion:
    text = text.strip()
    experiment = participant.room.experiment
    if len(text) < experiment.opinion_min_chars:
        raise InvalidInput(f"Please write at least {experiment.opinion_min_chars} characters.")
    if len(text) > experiment.opinion_max_chars:
        raise InvalidInput(
            f"Please keep your opinion under {experiment.opinion_max_chars} characters (it has {len(text)})."
        )
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__arm").get(room_id=participant.room_id, index=0)
        existing = Opinion.objects.filter(round=round_, participant=participant).first()
        if existing is not None:
            return existing  # A double submit or a second tab: one opinion, the first.
        if round_.phase != Round.Phase.OPINIONS:
            raise WrongPhase("Opinions can no longer be submitted in this round.")
        if participant.dropped_out_at is not None:
            raise WrongPhase("You were marked as having left this discussion.")
        opinion = Opinion.objects.create(round=round_, participant=participant, text=text)
        Participant.objects.filter(pk=participant.pk).update(opinion_draft="")
        events.send_on_commit(
            events.OpinionSubmitted(room_id=round_.room_id, round_id=round_.pk, participant_id=participant.pk)
        )
        active_ids = {p.pk for p in _active_participants(round_)}
        submitted_ids = set(round_.opinions.values_list("participant_id", flat=True))
        if active_ids <= submitted_ids:
            _begin_mediation(round_=round_)
    return opinion


def round_deadline_fire(*, round_id: int, phase: str) -> str:
    """A phase timer fired. Checked against the database, so a late or duplicate timer does nothing."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__experiment", "room__arm").get(pk=round_id)
        if round_.phase != phase:
            return "stale"
        if round_.phase_deadline is not None and round_.phase_deadline > timezone.now():
            return "early"
        if phase == Round.Phase.OPINIONS:
            writers = set(round_.opinions.values_list("participant_id", flat=True))
            silent = [p for p in _active_participants(round_) if p.pk not in writers]
            if len(writers) >= MIN_OPINIONS_FOR_MEDIATION:
                _drop_out(participants=silent, reason="no opinion before the deadline")
                _begin_mediation(round_=round_)
                return "mediating"
            _drop_out(participants=silent, reason="no opinion before the deadline")
            _round_finish(round_=round_, outcome=Round.Outcome.ABANDONED)
            return "abandoned"
        if phase == Round.Phase.RATING:
            unfinished = [p for p in _active_participants(round_) if p.finished_at is None and p.pk in _raters(round_)]
            _drop_out(participants=unfinished, reason="did not finish rating before the deadline")
            _round_finish(round_=round_, outcome=Round.Outcome.COMPLETED)
            return "done"
    return "ignored"


def _round_finish(*, round_: Round, outcome: str) -> None:
    round_.outcome = outcome
    round_.finished_at = timezone.now()
    _set_phase(round_=round_, phase=Round.Phase.DONE, deadline_seconds=None)
    Room.objects.filter(pk=round_.room_id).update(status=Room.Status.CLOSED, closed_at=timezone.now())


# --- Mediation ---------------------------------------------------------------------


@dataclass(frozen=True)
class MediationInput:
    round_id: int
    question: str
    participant_ids: list[int]
    opinions: list[str]
    seed: int
    arm_id: int


def mediation_claim(*, round_id: int) -> MediationInput | None:
    """Mark an attempt and return what the pipeline needs, or None if there is nothing to do."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__question").get(pk=round_id)
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.exists():
            return None
        round_.mediation_attempts += 1
        round_.progress_stage = "generating"
        round_.save(update_fields=["mediation_attempts", "progress_stage"])
        opinions = list(
            round_.opinions.filter(participant__dropped_out_at__isnull=True).select_related("participant").order_by("participant_id")
        )
        return MediationInput(
            round_id=round_.pk,
            question=round_.room.question.text,
            participant_ids=[o.participant_id for o in opinions],
            opinions=[o.text for o in opinions],
            seed=round_.seed,
            arm_id=round_.room.arm_id,
        )


def mediation_progress(*, round_id: int, stage: str, done: int, total: int) -> None:
    with transaction.atomic():
        updated = Round.objects.filter(pk=round_id, phase=Round.Phase.MEDIATING).update(
            progress_stage=stage, progress_done=done, progress_total=total
        )
        if updated:
            room_id = Round.objects.values_list("room_id", flat=True).get(pk=round_id)
            events.send_on_commit(
                events.MediationProgress(room_id=room_id, round_id=round_id, stage=stage, done=done, total=total)
            )


def _presentation_order(*, round_: Round, participant: Participant, candidate_ids: list[int]) -> list[int]:
    # Deterministic per participant, so the order can be reproduced from the round's seed.
    digest = hashlib.sha256(f"{round_.seed}:{participant.pk}".encode()).hexdigest()
    order = list(candidate_ids)
    random.Random(int(digest[:16], 16)).shuffle(order)
    return order


def candidates_store(*, mediation: MediationInput, result: "MediationResult") -> bool:
    """Store candidates, predictions and the ranking, then open rating. Idempotent: a redelivered task stores nothing twice."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__arm", "room__experiment").get(pk=mediation.round_id)
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.exists():
            return False
        arm = round_.room.arm
        rank_of = {candidate_index: position + 1 for position, candidate_index in enumerate(result.welfare.ranking)}
        shown_indices = set(result.welfare.ranking[: arm.k_shown])
        stored: list[Candidate] = []
        for index, generated in enumerate(result.candidates):
            stored.append(
                Candidate.objects.create(
                    round=round_,
                    index=index,
                    text=generated.text,
                    backend=generated.backend,
                    model_id=generated.model_id,
                    model_revision=generated.model_revision,
                    seed=generated.seed,
                    opinion_order=[mediation.participant_ids[i] for i in generated.opinion_order],
                    prompt=generated.prompt,
                    prompt_tokens=generated.prompt_tokens,
                    completion_tokens=generated.completion_tokens,
                    latency_ms=generated.latency_ms,
                    welfare=float(result.welfare.welfare[index]),
                    welfare_method=arm.welfare_method,
                    rank=rank_of.get(index),
                    shown=index in shown_indices,
                )
            )
        PredictedAgreement.objects.bulk_create(
            PredictedAgreement(
                candidate=stored[c],
                participant_id=participant_id,
                score=float(result.predicted[p][c]),
                reward_model=result.reward_model,
                reward_model_version=result.reward_model_version,
            )
            for p, participant_id in enumerate(mediation.participant_ids)
            for c in range(len(stored))
        )
        shown_ids = [candidate.pk for candidate in sorted(stored, key=lambda c: c.rank or 0) if candidate.shown]
        raters = Participant.objects.filter(pk__in=mediation.participant_ids, dropped_out_at__isnull=True)
        Presentation.objects.bulk_create(
            Presentation(participant=participant, candidate_id=candidate_id, position=position)
            for participant in raters
            for position, candidate_id in enumerate(
                _presentation_order(round_=round_, participant=participant, candidate_ids=shown_ids)
            )
        )
        round_.progress_stage = "ready"
        round_.progress_done = round_.progress_total = len(stored)
        round_.rating_started_at = timezone.now()
        round_.mediation_error = ""
        events.send_on_commit(events.CandidatesReady(room_id=round_.room_id, round_id=round_.pk))
        _set_phase(round_=round_, phase=Round.Phase.RATING, deadline_seconds=round_.room.experiment.rating_seconds)
    return True


def mediation_fail(*, round_id: int, error: str, final: bool) -> None:
    """Record a failed attempt; after the last retry the round ends as failed rather than stalling the group."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(pk=round_id)
        if round_.phase != Round.Phase.MEDIATING:
            return
        round_.mediation_error = error[:4000]
        round_.progress_stage = "failed" if final else "retrying"
        round_.save(update_fields=["mediation_error", "progress_stage"])
        if final:
            _round_finish(round_=round_, outcome=Round.Outcome.FAILED)
        else:
            events.send_on_commit(
                events.MediationProgress(room_id=round_.room_id, round_id=round_.pk, stage="retrying", done=0, total=round_.progress_total)
            )


# --- Rating ------------------------------------------------------------------------


def _raters(round_: Round) -> set[int]:
    return set(Presentation.objects.filter(candidate__round=round_).values_list("participant_id", flat=True))


def _parse_likert(value: object, *, what: str) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        raise InvalidInput(f"Please choose your {what} on the 1–7 scale.") from None
    if not 1 <= number <= 7:
        raise InvalidInput(f"Your {what} must be between 1 and 7.")
    return number


def _rating_round(*, participant: Participant) -> Round:
    round_ = Round.objects.select_for_update().get(room_id=participant.room_id, index=0)
    if round_.phase != Round.Phase.RATING:
        raise WrongPhase("Statements can only be rated while the rating phase is open.")
    if participant.finished_at is not None:
        raise WrongPhase("You have already submitted your ranking.")
    if participant.dropped_out_at is not None:
        raise WrongPhase("You were marked as having left this discussion.")
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
        participant = Participant.objects.select_for_update().get(pk=participant.pk)
        existing = Ranking.objects.filter(participant=participant, round__room_id=participant.room_id).first()
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
        order = sorted(ranks, key=lambda candidate_id: ranks[candidate_id])
        ranking = Ranking.objects.create(participant=participant, round=round_, order=order)
        participant.finished_at = timezone.now()
        participant.save(update_fields=["finished_at"])
        events.send_on_commit(events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
        raters = _raters(round_)
        still_rating = Participant.objects.filter(
            pk__in=raters, finished_at__isnull=True, dropped_out_at__isnull=True
        ).exists()
        if not still_rating:
            _round_finish(round_=round_, outcome=Round.Outcome.COMPLETED)
    return ranking


def experiment_pause(*, experiment: Experiment, paused: bool) -> Experiment:
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        experiment.status = Experiment.Status.PAUSED if paused else Experiment.Status.ACTIVE
        experiment.save(update_fields=["status"])
    return experiment

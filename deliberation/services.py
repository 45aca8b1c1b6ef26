"""Every write to deliberation state goes through these functions.

Each runs inside transaction.atomic, takes keyword-only arguments, locks the
rows it moves between phases (select_for_update), and sends its events and
enqueues its tasks only after commit.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import events, selectors
from .models import (
    AllowedExternalId,
    Arm,
    AttentionCheck,
    Candidate,
    DatasetExport,
    Experiment,
    Opinion,
    OpinionRating,
    PageView,
    PairwisePreference,
    Participant,
    PredictedAgreement,
    Presentation,
    Question,
    Ranking,
    Rating,
    Release,
    Room,
    RoomAssignment,
    Round,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from modeling.pipeline import MediationResult

# Enough to show a stable alphabet of anonymous names in a room of up to 8.
PARTICIPANT_LABELS = ["A", "B", "C", "D", "E", "F", "G", "H"]
MIN_OPINIONS_FOR_MEDIATION = 2
# Claims of one round's mediation (Celery retries and recoveries together) before it ends as failed.
MAX_MEDIATION_ATTEMPTS = 3
# A phase timer gets this long past its deadline to fire by itself before rounds_recover fires it.
DEADLINE_GRACE = timedelta(seconds=5)


class ServiceError(Exception):
    """A request that cannot be carried out; the message is shown to the person who made it."""


class JoinRefused(ServiceError):
    pass


class WrongPhase(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


# --- Joining ---------------------------------------------------------------------


@dataclass(frozen=True)
class ArmDraw:
    """One balanced, seeded arm assignment, with what is needed to reproduce it."""

    arm: Arm
    seed: int
    ordinal: int
    counts: dict[str, int]
    tied_arm_ids: list[int]


def _draw_arm(*, experiment: Experiment) -> ArmDraw:
    """Balanced assignment: the arm furthest below its weighted share of rooms, ties broken by a seeded draw.

    Arms with weight 0 are never assigned (for example an arm used only as a head-to-head opponent).
    The draw for the n-th room depends only on the experiment's seed, n and the counts so far, so the
    whole sequence can be replayed from the recorded seed.
    """
    arms = list(experiment.arms.filter(weight__gt=0).annotate(room_count=Count("rooms")).order_by("id"))
    if not arms:
        raise JoinRefused("This study is not set up yet: it has no conditions.")
    # Exact fractions: comparing room_count / weight as floats could split a tie that is one.
    share = {arm.pk: Fraction(arm.room_count, arm.weight) for arm in arms}
    fewest = min(share.values())
    tied = [arm for arm in arms if share[arm.pk] == fewest]
    ordinal = experiment.rooms.count()
    # random.Random seeded with a str hashes it with SHA-512: the same in every process.
    rng = random.Random(f"{experiment.assignment_seed}:{ordinal}")
    return ArmDraw(
        arm=rng.choice(tied),
        seed=experiment.assignment_seed,
        ordinal=ordinal,
        counts={str(arm.pk): arm.room_count for arm in arms},
        tied_arm_ids=[arm.pk for arm in tied],
    )


def _choose_arm(*, experiment: Experiment) -> Arm:
    return _draw_arm(experiment=experiment).arm


def question_pool(*, experiment: Experiment):
    """The questions an experiment draws from: its attached ones or, if none are attached and a split
    or topic filter is set, the whole bank; either way narrowed by the split and topic filters."""
    if experiment.questions.exists():
        pool = experiment.questions.all()
    elif experiment.question_split or experiment.question_topic:
        pool = Question.objects.all()
    else:
        return Question.objects.none()
    if experiment.question_split:
        pool = pool.filter(split=experiment.question_split)
    if experiment.question_topic:
        pool = pool.filter(topic=experiment.question_topic)
    return pool.order_by("id")


def _choose_question(*, experiment: Experiment) -> Question:
    question_ids = list(question_pool(experiment=experiment).values_list("id", flat=True))
    if not question_ids:
        raise JoinRefused("This study is not set up yet: it has no questions.")
    # Every question once before any twice, in an order drawn from the recorded seed.
    random.Random(f"{experiment.assignment_seed}:questions").shuffle(question_ids)
    return Question.objects.get(pk=question_ids[experiment.rooms.count() % len(question_ids)])


def room_create(*, experiment: Experiment, arm: Arm | None = None, question: Question | None = None) -> Room:
    with transaction.atomic():
        draw = None if arm is not None else _draw_arm(experiment=experiment)
        ordinal = experiment.rooms.count()
        room = Room.objects.create(
            experiment=experiment,
            arm=arm if arm is not None else draw.arm,
            question=question or _choose_question(experiment=experiment),
            capacity=experiment.group_size,
        )
        RoomAssignment.objects.create(
            room=room,
            method="balanced" if draw is not None else "given",
            seed=experiment.assignment_seed,
            ordinal=ordinal,
            counts=draw.counts if draw is not None else {},
            tied_arm_ids=draw.tied_arm_ids if draw is not None else [],
        )
        Round.objects.create(room=room, index=0, seed=random.Random(f"{experiment.assignment_seed}:{room.pk}").getrandbits(31))
        if experiment.max_wait_seconds:
            _schedule_wait_deadline(room_id=room.pk, seconds=experiment.max_wait_seconds)
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
        if experiment.require_allow_list and not (
            external_id and AllowedExternalId.objects.filter(experiment=experiment, external_id=external_id).exists()
        ):
            raise JoinRefused(
                "This study is open only to invited participants, and your participant id is not on its list. "
                "Please open the study from the link your recruitment panel gave you."
            )
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


def _schedule_wait_deadline(*, room_id: int, seconds: float) -> None:
    from .dispatch import enqueue
    from .tasks import room_wait_deadline

    transaction.on_commit(lambda: enqueue(room_wait_deadline, args=[room_id], countdown=seconds + 0.5))


def release_code_for(participant: Participant) -> str:
    experiment = participant.room.experiment
    if experiment.release_code:
        return experiment.release_code
    digest = hashlib.sha256(f"{settings.SECRET_KEY}:release:{participant.code}".encode()).hexdigest()
    return f"R{digest[:8].upper()}"


def room_wait_deadline_fire(*, room_id: int) -> str:
    """The maximum wait for a forming group ran out: start with fewer people, or release them with a code.

    Checked against the database, so a late, early or duplicate timer does nothing.
    """
    with transaction.atomic():
        room = Room.objects.select_for_update().select_related("experiment").get(pk=room_id)
        experiment = room.experiment
        round_ = Round.objects.select_for_update().get(room=room, index=0)
        if room.status != Room.Status.OPEN or round_.phase != Round.Phase.WAITING:
            return "stale"
        waited = (timezone.now() - room.created_at).total_seconds()
        if not experiment.max_wait_seconds or waited < experiment.max_wait_seconds:
            return "early"
        members = list(room.participants.order_by("id"))
        if len(members) >= max(experiment.min_group_size, MIN_OPINIONS_FOR_MEDIATION):
            _round_open_opinions(round_=round_)
            return "started"
        for participant in members:
            Release.objects.create(participant=participant, code=release_code_for(participant), waited_seconds=waited)
        _round_finish(round_=round_, outcome=Round.Outcome.ABANDONED)
        return "released"


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

    round_.mediation_started_at = round_.progress_at = timezone.now()
    round_.progress_stage = "queued"
    round_.progress_done = 0
    round_.progress_total = sum(arm.n_candidates for arm in mediation_arms(round_.room.arm))
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


def mediation_arms(arm: Arm) -> list[Arm]:
    """The configurations a round of this arm runs: its own, then (head-to-head) the compared arm's."""
    return [arm, arm.compare_with] if arm.compare_with_id else [arm]


@dataclass(frozen=True)
class MediationInput:
    round_id: int
    question: str
    # Whose opinions go into generation and ranking, in this order (the excluded member is not here).
    participant_ids: list[int]
    opinions: list[str]
    seed: int
    arm_id: int
    # Who rates the statements: every member with an opinion, the excluded one included.
    rater_ids: list[int] = field(default_factory=list)
    # Arm ids whose configurations generate: the room's arm first, then a head-to-head opponent.
    source_arm_ids: list[int] = field(default_factory=list)
    excluded_participant_id: int | None = None

    def seed_for(self, source_arm_id: int) -> int:
        """The room's arm keeps the round's seed; an opponent gets its own, so the two never write the same text."""
        if source_arm_id == self.arm_id:
            return self.seed
        return random.Random(f"{self.seed}:arm:{source_arm_id}").getrandbits(31)


def mediation_claim(*, round_id: int) -> MediationInput | None:
    """Mark an attempt and return what the pipeline needs, or None if there is nothing to do.

    In an exclusion arm, one member (a seeded draw, recorded on the round and kept across retries)
    is silently left out of generation and ranking, but still rates the statements.
    """
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__question", "room__arm").get(pk=round_id)
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.exists():
            return None
        round_.mediation_attempts += 1
        # Loading the models can take a while on a fresh worker: say the mediator has started.
        round_.progress_stage = "starting"
        round_.progress_at = timezone.now()
        events.send_on_commit(
            events.MediationProgress(
                room_id=round_.room_id, round_id=round_.pk, stage="starting", done=0, total=round_.progress_total
            )
        )
        opinions = list(
            round_.opinions.filter(participant__dropped_out_at__isnull=True).select_related("participant").order_by("participant_id")
        )
        arm = round_.room.arm
        writer_ids = [o.participant_id for o in opinions]
        if arm.exclude_one_opinion and round_.excluded_participant_id is None and len(writer_ids) >= MIN_OPINIONS_FOR_MEDIATION:
            round_.excluded_participant_id = random.Random(f"{round_.seed}:exclude").choice(writer_ids)
        round_.save(update_fields=["mediation_attempts", "progress_stage", "progress_at", "excluded_participant"])
        included = [o for o in opinions if o.participant_id != round_.excluded_participant_id]
        return MediationInput(
            round_id=round_.pk,
            question=round_.room.question.text,
            participant_ids=[o.participant_id for o in included],
            opinions=[o.text for o in included],
            seed=round_.seed,
            arm_id=arm.pk,
            rater_ids=writer_ids,
            source_arm_ids=[a.pk for a in mediation_arms(arm)],
            excluded_participant_id=round_.excluded_participant_id,
        )


def mediation_progress(*, round_id: int, stage: str, done: int, total: int) -> None:
    with transaction.atomic():
        updated = Round.objects.filter(pk=round_id, phase=Round.Phase.MEDIATING).update(
            progress_stage=stage, progress_done=done, progress_total=total, progress_at=timezone.now()
        )
        if updated:
            room_id = Round.objects.values_list("room_id", flat=True).get(pk=round_id)
            events.send_on_commit(
                events.MediationProgress(room_id=room_id, round_id=round_id, stage=stage, done=done, total=total)
            )


def mediation_heartbeat(*, round_id: int) -> bool:
    """A mediation is still running: keep rounds_recover from taking its task for lost."""
    with transaction.atomic():
        return bool(Round.objects.filter(pk=round_id, phase=Round.Phase.MEDIATING).update(progress_at=timezone.now()))


def _presentation_order(*, round_: Round, participant: Participant, candidate_ids: list[int]) -> list[int]:
    # Deterministic per participant, so the order can be reproduced from the round's seed.
    digest = hashlib.sha256(f"{round_.seed}:{participant.pk}".encode()).hexdigest()
    order = list(candidate_ids)
    random.Random(int(digest[:16], 16)).shuffle(order)
    return order


@dataclass(frozen=True)
class SourcedResult:
    """One configuration's mediation output: which arm's generator, reward model and welfare produced it."""

    arm_id: int
    result: "MediationResult"


def _shown_per_source(*, k_shown: int, sources: int) -> list[int]:
    # Head-to-head splits the K shown statements between the two configurations, the room's arm first.
    if sources == 1:
        return [k_shown]
    own = math.ceil(k_shown / 2)
    return [own, k_shown - own]


def candidates_store(*, mediation: MediationInput, results: Sequence[SourcedResult]) -> bool:
    """Store candidates, predictions and rankings of every configuration, then open rating.

    Idempotent: a redelivered task stores nothing twice. Rank and shown are within each source arm.
    """
    with transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("room__arm", "room__experiment").get(pk=mediation.round_id)
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.exists():
            return False
        if [r.arm_id for r in results] != (mediation.source_arm_ids or [mediation.arm_id]):
            raise ValueError("mediation results do not match the round's configurations")
        arms = {arm.pk: arm for arm in Arm.objects.filter(pk__in=[r.arm_id for r in results])}
        quotas = _shown_per_source(k_shown=round_.room.arm.k_shown, sources=len(results))
        stored: list[Candidate] = []
        shown_ids: list[int] = []
        for sourced, quota in zip(results, quotas):
            result, arm = sourced.result, arms[sourced.arm_id]
            rank_of = {candidate_index: position + 1 for position, candidate_index in enumerate(result.welfare.ranking)}
            shown_indices = set(result.welfare.ranking[:quota])
            these: list[Candidate] = []
            for local_index, generated in enumerate(result.candidates):
                these.append(
                    Candidate.objects.create(
                        round=round_,
                        index=len(stored) + local_index,
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
                        welfare=float(result.welfare.welfare[local_index]),
                        welfare_method=arm.welfare_method,
                        rank=rank_of.get(local_index),
                        shown=local_index in shown_indices,
                        source_arm=arm,
                    )
                )
            PredictedAgreement.objects.bulk_create(
                PredictedAgreement(
                    candidate=these[c],
                    participant_id=participant_id,
                    score=float(result.predicted[p][c]),
                    reward_model=result.reward_model,
                    reward_model_version=result.reward_model_version,
                )
                for p, participant_id in enumerate(mediation.participant_ids)
                for c in range(len(these))
            )
            shown_ids += [candidate.pk for candidate in sorted(these, key=lambda c: c.rank or 0) if candidate.shown]
            stored += these
        raters = Participant.objects.filter(
            pk__in=mediation.rater_ids or mediation.participant_ids, dropped_out_at__isnull=True
        )
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
        round_.progress_at = timezone.now()
        round_.save(update_fields=["mediation_error", "progress_stage", "progress_at"])
        if final:
            _round_finish(round_=round_, outcome=Round.Outcome.FAILED)
        else:
            events.send_on_commit(
                events.MediationProgress(room_id=round_.room_id, round_id=round_.pk, stage="retrying", done=0, total=round_.progress_total)
            )


# --- Recovery of lost tasks ----------------------------------------------------------


@dataclass
class RecoveryReport:
    """What one rounds_recover sweep redid; empty (false) when nothing was lost."""

    requeued: list[int] = field(default_factory=list)  # rounds whose mediation was enqueued again
    failed: list[int] = field(default_factory=list)  # rounds that ran out of mediation attempts
    deadlines: dict[int, str] = field(default_factory=dict)  # round id: what its overdue phase deadline did
    waits: dict[int, str] = field(default_factory=dict)  # room id: what its overdue wait for a group did

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.deadlines or self.waits)


def rounds_recover(*, stalled_after: timedelta, now: datetime | None = None) -> RecoveryReport:
    """Redo work whose task was lost, so that no round waits forever.

    Tasks travel through the broker (Redis), which can lose them: a restart without persistence
    empties the queues and forgets unacknowledged and scheduled messages, and an enqueue while it
    is down fails after the write it belonged to has committed. The database still says what
    should be happening, so this sweep reads it and acts:

    - a round in mediation, without candidates, that showed no sign of progress for
      `stalled_after` gets its mediate_round task again (or, once it has used up
      MAX_MEDIATION_ATTEMPTS, ends as failed rather than keep its group waiting);
    - an opinion or rating phase whose deadline passed DEADLINE_GRACE ago fires it;
    - a forming group whose maximum wait ran out fires that.

    Idempotent, and safe from any number of processes at once: each row is rechecked under its
    lock, a requeue restarts the stall clock, the deadline services check the database, and
    mediation_claim and candidates_store do nothing twice. A false alarm (a task still queued
    behind others, or a very slow model load) costs at most a duplicate message that finds
    nothing to do.
    """
    now = now or timezone.now()
    report = RecoveryReport()
    cutoff = now - stalled_after
    stalled = (
        Round.objects.filter(phase=Round.Phase.MEDIATING, candidates__isnull=True)
        .annotate(last_sign=Coalesce("progress_at", "mediation_started_at"))
        .filter(last_sign__lt=cutoff)
        .values_list("pk", flat=True)
        .distinct()
    )
    for round_id in list(stalled):
        outcome = _mediation_recover(round_id=round_id, cutoff=cutoff, now=now)
        if outcome == "requeued":
            report.requeued.append(round_id)
        elif outcome == "failed":
            report.failed.append(round_id)
    overdue = Round.objects.filter(
        phase__in=[Round.Phase.OPINIONS, Round.Phase.RATING], phase_deadline__lt=now - DEADLINE_GRACE
    ).values_list("pk", "phase")
    for round_id, phase in list(overdue):
        report.deadlines[round_id] = round_deadline_fire(round_id=round_id, phase=phase)
    forming = Room.objects.filter(
        status=Room.Status.OPEN, experiment__max_wait_seconds__gt=0, rounds__index=0, rounds__phase=Round.Phase.WAITING
    ).values_list("pk", "created_at", "experiment__max_wait_seconds")
    for room_id, created_at, max_wait_seconds in list(forming):
        if created_at + timedelta(seconds=max_wait_seconds) + DEADLINE_GRACE < now:
            report.waits[room_id] = room_wait_deadline_fire(room_id=room_id)
    return report


def _mediation_recover(*, round_id: int, cutoff: datetime, now: datetime) -> str:
    from .dispatch import enqueue
    from .tasks import mediate_round

    with transaction.atomic():
        # A row locked by someone else (a worker claiming it right now) is moving: leave it.
        round_ = Round.objects.select_for_update(skip_locked=True).filter(pk=round_id).first()
        if round_ is None:
            return "busy"
        last_sign = round_.progress_at or round_.mediation_started_at
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.exists() or last_sign is None or last_sign >= cutoff:
            return "moved"
        round_.progress_at = now
        if round_.mediation_attempts >= MAX_MEDIATION_ATTEMPTS:
            round_.mediation_error = (round_.mediation_error + "\n" if round_.mediation_error else "") + (
                f"no progress since {last_sign.isoformat()} after {round_.mediation_attempts} attempts"
            )
            round_.progress_stage = "failed"
            round_.save(update_fields=["progress_at", "progress_stage", "mediation_error"])
            _round_finish(round_=round_, outcome=Round.Outcome.FAILED)
            return "failed"
        round_.progress_stage = "queued"
        round_.progress_done = 0
        round_.save(update_fields=["progress_at", "progress_stage", "progress_done"])
        events.send_on_commit(
            events.MediationProgress(room_id=round_.room_id, round_id=round_.pk, stage="queued", done=0, total=round_.progress_total)
        )
        transaction.on_commit(lambda: enqueue(mediate_round, args=[round_id]))
    return "requeued"


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
        _check_protocol_items_done(participant=participant, round_=round_)
        order = sorted(ranks, key=lambda candidate_id: ranks[candidate_id])
        ranking = Ranking.objects.create(participant=participant, round=round_, order=order)
        participant.finished_at = timezone.now()
        participant.save(update_fields=["finished_at"])
        events.send_on_commit(events.ParticipantFinished(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
        raters = _raters(round_)
        still_rating = Participant.objects.filter(
            pk__in=raters, finished_at__isnull=True, dropped_out_at__isnull=True
        ).exists()
        if not still_rating:
            _round_finish(round_=round_, outcome=Round.Outcome.COMPLETED)
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
        participant = Participant.objects.select_for_update().select_related("room__experiment").get(pk=participant.pk)
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
        participant = Participant.objects.select_for_update().select_related("room__experiment").get(pk=participant.pk)
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


# --- Cohorts -------------------------------------------------------------------------


def allow_list_add(*, experiment: Experiment, external_ids: Iterable[str]) -> int:
    """Add external ids (one per item; blanks ignored) to the experiment's allow-list; returns how many were new."""
    wanted = {value.strip()[:200] for value in external_ids if value and value.strip()}
    with transaction.atomic():
        known = set(AllowedExternalId.objects.filter(experiment=experiment, external_id__in=wanted).values_list("external_id", flat=True))
        AllowedExternalId.objects.bulk_create(
            [AllowedExternalId(experiment=experiment, external_id=value) for value in sorted(wanted - known)], ignore_conflicts=True
        )
    return len(wanted - known)


def page_view_record(*, participant_id: int, view: str, round_id: int | None, phase: str = "") -> bool:
    """Record that a participant was shown a screen; a repeat of the screen they were already on is not a new view."""
    with transaction.atomic():
        last = PageView.objects.filter(participant_id=participant_id).order_by("-shown_at", "-id").first()
        if last is not None and last.view == view and last.round_id == round_id:
            return False
        PageView.objects.create(participant_id=participant_id, view=view, round_id=round_id, phase=phase)
    return True


def experiment_pause(*, experiment: Experiment, paused: bool) -> Experiment:
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        experiment.status = Experiment.Status.PAUSED if paused else Experiment.Status.ACTIVE
        experiment.save(update_fields=["status"])
    return experiment


# --- Dataset exports ---------------------------------------------------------------------


def dataset_export_request(
    *,
    experiment: Experiment,
    requested_by: "AbstractBaseUser | None",
    via: str,
    format: str,
    include_external_ids: bool = False,
    out_dir: str | Path | None = None,
    enqueue_task: bool = True,
) -> DatasetExport:
    """Write the audit-log row of an export and (after commit) enqueue the task that writes it."""
    if format not in DatasetExport.Format.values:
        raise InvalidInput(f"Unknown export format {format!r}: choose one of {', '.join(DatasetExport.Format.values)}.")
    if format == DatasetExport.Format.PARQUET:
        from .exports import parquet_available

        if not parquet_available():
            raise InvalidInput("Parquet export needs the pyarrow package; install it or choose csv or jsonl.")
    from .exports import default_export_dir

    directory = Path(out_dir) if out_dir else default_export_dir()
    with transaction.atomic():
        export = DatasetExport.objects.create(
            experiment=experiment,
            requested_by=requested_by if requested_by is not None and requested_by.is_authenticated else None,
            requested_via=via,
            format=format,
            include_external_ids=include_external_ids,
            out_dir=str(directory.resolve()),
        )
        if enqueue_task:
            from .dispatch import enqueue
            from .tasks import export_dataset

            export_id = export.pk

            def enqueue_or_fail() -> None:
                # Nothing sweeps for lost exports: one that could not be queued says so on the exports page.
                if not enqueue(export_dataset, args=[export_id]):
                    dataset_export_fail(export_id=export_id, error="Could not be queued: the task broker was unavailable. Please request it again.")

            transaction.on_commit(enqueue_or_fail)
    return export


def dataset_export_claim(*, export_id: int) -> DatasetExport | None:
    """Start (or, after a lost worker, restart) an export; None when it is already done."""
    with transaction.atomic():
        export = DatasetExport.objects.select_for_update().select_related("experiment").get(pk=export_id)
        if export.status == DatasetExport.Status.DONE:
            return None
        export.status = DatasetExport.Status.RUNNING
        export.started_at = timezone.now()
        export.error = ""
        export.save(update_fields=["status", "started_at", "error"])
    return export


def dataset_export_progress(*, export_id: int, done: int, total: int) -> None:
    DatasetExport.objects.filter(pk=export_id, status=DatasetExport.Status.RUNNING).update(progress_done=done, progress_total=total)


def dataset_export_finish(*, export_id: int, path: str, sha256: str, row_counts: dict[str, int]) -> None:
    with transaction.atomic():
        DatasetExport.objects.filter(pk=export_id).update(
            status=DatasetExport.Status.DONE, path=path, sha256=sha256, row_counts=row_counts, finished_at=timezone.now()
        )


def dataset_export_fail(*, export_id: int, error: str) -> None:
    with transaction.atomic():
        DatasetExport.objects.filter(pk=export_id).update(status=DatasetExport.Status.FAILED, error=error[:4000], finished_at=timezone.now())

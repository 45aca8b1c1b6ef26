"""A round's phases: opening, opinions, deadlines and timers, dropouts and the end of a round.

Only these functions (and mediation's and rating's, through them) move a round between phases,
each under the round's row lock, so two requests cannot both advance it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from .. import dispatch, events, selectors
from ..dispatch import TaskName
from ..inputs import clean_text, visible_length
from ..models import MIN_OPINIONS_FOR_MEDIATION, Opinion, Participant, Position, Release, Room, Round
from .errors import InvalidInput, WrongPhase

# The label of a researcher's seat as mediator (members are "Participant A", "Participant B", ...).
RESEARCHER_SEAT_LABEL = "Mediator (researcher)"


def round_phase_set(*, round_: Round, phase: str, deadline_seconds: int | None) -> None:
    now = timezone.now()
    round_.phase = phase
    round_.phase_deadline = now + timedelta(seconds=deadline_seconds) if deadline_seconds else None
    round_.save()
    events.send_on_commit(events.PhaseChanged(room_id=round_.room_id, round_id=round_.pk, phase=phase))
    if deadline_seconds:
        _round_deadline_schedule(round_id=round_.pk, phase=phase, seconds=deadline_seconds)


def _round_deadline_schedule(*, round_id: int, phase: str, seconds: float) -> None:
    # A little slack, so the task never fires before the deadline it checks.
    transaction.on_commit(lambda: dispatch.enqueue(TaskName.ROUND_DEADLINE, args=[round_id, phase], countdown=seconds + 0.5))


def room_wait_deadline_schedule(*, room_id: int, seconds: float) -> None:
    transaction.on_commit(lambda: dispatch.enqueue(TaskName.ROOM_WAIT_DEADLINE, args=[room_id], countdown=seconds + 0.5))


def room_wait_deadline_fire(*, room_id: int) -> str:
    """The maximum wait for a forming group ran out: start with fewer people, or release them with a code.

    Checked against the database, so a late, early or duplicate timer does nothing.
    """
    with transaction.atomic():
        room = Room.objects.select_for_update(of=("self",)).select_related("experiment").get(pk=room_id)
        experiment = room.experiment
        round_ = Round.objects.select_for_update().current(room_id=room.pk)
        if room.status != Room.Status.OPEN or round_.phase != Round.Phase.WAITING:
            return "stale"
        waited = (timezone.now() - room.created_at).total_seconds()
        if not experiment.max_wait_seconds or waited < experiment.max_wait_seconds:
            return "early"
        members = list(room.participants.order_by("id"))
        if len(members) >= experiment.min_group_size and round_.can_be_mediated(len(members)):
            round_open_opinions(round_=round_)
            return "started"
        for participant in members:
            Release.objects.create(participant=participant, code=participant.release_code(), waited_seconds=waited)
        round_finish(round_=round_, outcome=Round.Outcome.ABANDONED)
        return "released"


def round_open_opinions(*, round_: Round) -> None:
    if round_.phase != Round.Phase.WAITING:
        return
    room = Room.objects.select_for_update().get(pk=round_.room_id)
    room.status = Room.Status.RUNNING
    room.started_at = timezone.now()
    room.save(update_fields=["status", "started_at"])
    round_.opinions_started_at = timezone.now()
    if room.arm.human_mediator and round_.mediator_id is None and room.arm.mediator_is_researcher:
        # A researcher mediates: the room gets a seat for them (not a member: no opinion, no rating, not in the
        # presence list), from which the monitor's mediator page writes the statement.
        seat = Participant.objects.create(room=room, label=RESEARCHER_SEAT_LABEL, consented_at=timezone.now(), researcher_seat=True)
        round_.mediator_id = seat.pk
    elif room.arm.human_mediator and round_.mediator_id is None:
        # Human mediator arm: a seeded draw (reproducible from the round's seed) names the member who writes
        # the statement instead of an opinion.
        members = list(room.participants.filter(dropped_out_at__isnull=True).order_by("id").values_list("pk", flat=True))
        round_.mediator_id = random.Random(f"{round_.seed}:mediator").choice(members)
    round_phase_set(round_=round_, phase=Round.Phase.OPINIONS, deadline_seconds=room.experiment.opinion_seconds)


def round_start(*, room: Room) -> Round:
    """Start the opinion phase before the group is full (a researcher's decision)."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().current(room_id=room.pk)
        if round_.phase != Round.Phase.WAITING:
            raise WrongPhase("This round has already started.")
        joined = room.participants.count()
        if not round_.can_be_mediated(joined):
            raise InvalidInput(f"At least {MIN_OPINIONS_FOR_MEDIATION} participants must join first ({joined} so far).")
        round_open_opinions(round_=round_)
    return round_


def _begin_mediation(*, round_: Round) -> None:
    if round_.mediator_id is not None:
        # Human mediator arm: the mediator writes, with the opinion phase's time as a timer; a model writes beside
        # them only in a head-to-head arm (compare_with).
        round_.mediation_started_at = timezone.now()
        round_phase_set(round_=round_, phase=Round.Phase.MEDIATING, deadline_seconds=round_.room.experiment.opinion_seconds)
        if round_.room.arm.compare_with_id is not None:
            round_.progress_at = round_.mediation_started_at
            round_.progress_total = sum(arm.n_candidates for arm in round_.room.arm.mediation_arms()[1:])
            round_.save(update_fields=["progress_at", "progress_total"])
            round_id = round_.pk
            transaction.on_commit(lambda: dispatch.enqueue(TaskName.MEDIATE_ROUND, args=[round_id]))
        return
    round_.mediation_started_at = round_.progress_at = timezone.now()
    round_.progress_stage = Round.Stage.QUEUED
    round_.progress_done = 0
    round_.progress_total = sum(arm.n_candidates for arm in round_.room.arm.mediation_arms())
    round_phase_set(round_=round_, phase=Round.Phase.MEDIATING, deadline_seconds=None)
    round_id = round_.pk
    transaction.on_commit(lambda: dispatch.enqueue(TaskName.MEDIATE_ROUND, args=[round_id]))


def _drop_out(*, participants: Sequence[Participant], reason: str) -> None:
    now = timezone.now()
    for participant in participants:
        participant.dropped_out_at = now
        participant.dropout_reason = reason
        participant.save(update_fields=["dropped_out_at", "dropout_reason"])


def opinion_save_draft(*, participant: Participant, text: str) -> None:
    """Keep what a participant has typed, so a reload or a lost connection loses nothing."""
    text = clean_text(text)
    limit = participant.room.experiment.opinion_max_chars
    Participant.objects.filter(pk=participant.pk).update(opinion_draft=text[: limit * 2])


def opinion_submit(*, participant: Participant, text: str) -> Opinion:
    text = clean_text(text).strip()
    experiment = participant.room.experiment
    if visible_length(text) < experiment.opinion_min_chars:
        raise InvalidInput(f"Please write at least {experiment.opinion_min_chars} characters.")
    if len(text) > experiment.opinion_max_chars:
        raise InvalidInput(
            f"Please keep your opinion under {experiment.opinion_max_chars} characters (it has {len(text)})."
        )
    with transaction.atomic():
        round_ = Round.objects.select_for_update(of=("self",)).select_related("room__arm").current(room_id=participant.room_id)
        existing = Opinion.objects.filter(round=round_, participant=participant).first()
        if existing is not None:
            return existing  # A double submit or a second tab: one opinion, the first.
        if not round_.accepts_opinions():
            raise WrongPhase("Opinions can no longer be submitted in this round.")
        if participant.has_left:
            raise WrongPhase("You were marked as having left this discussion.")
        if round_.mediator_id == participant.pk:
            raise WrongPhase("As this round's mediator, you write the group statement, not an opinion.")
        if (
            round_.index == 0
            and participant.room.experiment.ask_positions
            and not Position.objects.filter(participant=participant, stage=Position.Stage.BEFORE).exists()
        ):
            raise InvalidInput("Please give your position on the question first.")
        opinion = Opinion.objects.create(round=round_, participant=participant, text=text)
        Participant.objects.filter(pk=participant.pk).update(opinion_draft="")
        events.send_on_commit(
            events.OpinionSubmitted(room_id=round_.room_id, round_id=round_.pk, participant_id=participant.pk)
        )
        if round_.all_opinions_in():
            _begin_mediation(round_=round_)
    return opinion


def round_deadline_fire(*, round_id: int, phase: str) -> str:
    """A phase timer fired. Checked against the database, so a late or duplicate timer does nothing."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update(of=("self",)).select_related("room__experiment", "room__arm").get(pk=round_id)
        if round_.phase != phase:
            return "stale"
        if round_.deadline_pending(timezone.now()):
            return "early"
        if phase == Round.Phase.OPINIONS:
            writers = set(round_.opinions.values_list("participant_id", flat=True))
            silent = [p for p in round_.active_participants() if p.pk not in writers]
            if round_.can_be_mediated(len(writers)):
                _drop_out(participants=silent, reason="no opinion before the deadline")
                _begin_mediation(round_=round_)
                return "mediating"
            _drop_out(participants=silent, reason="no opinion before the deadline")
            round_finish(round_=round_, outcome=Round.Outcome.ABANDONED)
            return "abandoned"
        if phase == Round.Phase.MEDIATING and round_.mediator_id is not None:
            # The human mediator wrote no statement in time: the round fails, as a model that keeps failing does.
            if round_.candidates.filter(author__isnull=False).exists():
                return "stale"
            round_.mediation_error = "the human mediator wrote no statement before the deadline"
            round_.save(update_fields=["mediation_error"])
            round_finish(round_=round_, outcome=Round.Outcome.FAILED)
            return "failed"
        if phase == Round.Phase.DONE:
            return _closing_deadline_fire(round_=round_)
        if phase == Round.Phase.RATING:
            raters = round_.rater_ids()
            ranked = round_.ranked_ids()
            unfinished = [p for p in round_.active_participants() if p.pk in raters and p.pk not in ranked]
            _drop_out(participants=unfinished, reason="did not finish rating before the deadline")
            round_finish(round_=round_, outcome=Round.Outcome.COMPLETED)
            return "done"
    return "ignored"


def round_finish(*, round_: Round, outcome: str) -> None:
    round_.outcome = outcome
    round_.finished_at = timezone.now()
    round_phase_set(round_=round_, phase=Round.Phase.DONE, deadline_seconds=None)
    if outcome == Round.Outcome.COMPLETED and _critique_round_open(previous=round_):
        return
    Room.objects.filter(pk=round_.room_id).update(status=Room.Status.CLOSED, closed_at=timezone.now())
    if outcome == Round.Outcome.COMPLETED:
        _closing_timer_start(round_=round_)


def _closing_timer_start(*, round_: Round) -> None:
    """After the last round, the closing questions (final preference, position after) get a timer like the other
    phases: the round's deadline while it is done, fired by the same ROUND_DEADLINE task (phase "done") and, if that
    task is lost, by the recovery sweep. It runs for the rating phase's time (0: no timer, as for rating)."""
    experiment = Room.objects.select_related("experiment").get(pk=round_.room_id).experiment
    seconds = experiment.rating_seconds
    if not seconds or (not experiment.ask_positions and selectors.closing_statements(round_=round_) is None):
        return  # no closing questions (or no timers in this study)
    round_.phase_deadline = timezone.now() + timedelta(seconds=seconds)
    round_.save(update_fields=["phase_deadline"])
    _round_deadline_schedule(round_id=round_.pk, phase=Round.Phase.DONE, seconds=seconds)


def _closing_deadline_fire(*, round_: Round) -> str:
    """The closing questions' timer ran out: members who ranked the last round and have not answered took part to the
    end of the discussion, so they are finished (with their code) but recorded with the step missing
    (Participant.closing_missed_at), which their completion status and code say; they are not marked dropped."""
    if round_.phase_deadline is None:
        return "stale"  # fired already (or no closing timer)
    now = timezone.now()
    late = list(
        Participant.objects.select_for_update()
        .filter(pk__in=round_.ranked_ids(), finished_at__isnull=True, dropped_out_at__isnull=True)
        .order_by("id")
    )
    for participant in late:
        participant.finished_at = participant.closing_missed_at = now
        participant.save(update_fields=["finished_at", "closing_missed_at"])
        events.send_on_commit(events.ParticipantFinished(room_id=round_.room_id, round_id=round_.pk, participant_id=participant.pk))
    round_.phase_deadline = None
    round_.save(update_fields=["phase_deadline"])
    return "closing missed" if late else "closed"


def _critique_round_open(*, previous: Round) -> Round | None:
    """After a completed round, the next critique round (if the experiment asks for one and enough members are
    still in): the members critique the winning statement, in a round that reuses the opinion phase's machinery
    (timer, limits, drafts, dropouts); the critiques are that round's Opinion rows."""
    experiment = Room.objects.select_related("experiment").get(pk=previous.room_id).experiment
    if previous.is_last(critique_rounds=experiment.critique_rounds):
        return None
    winner = previous.winning_candidate()
    ranked = previous.ranked_ids()
    critics = [p for p in previous.active_participants() if p.pk in ranked]
    if winner is None or not previous.can_be_mediated(len(critics)):
        return None  # too few members left to revise for: the room ends after this round
    round_ = Round.objects.create(
        room_id=previous.room_id,
        index=previous.index + 1,
        kind=Round.Kind.CRITIQUE,
        seed=random.Random(f"{previous.seed}:critique:{previous.index + 1}").getrandbits(31),
        previous_winner=winner,
        mediator_id=previous.mediator_id,
        excluded_participant_id=previous.excluded_participant_id,
        opinions_started_at=timezone.now(),
    )
    # Members who did not rank the previous round (rating deadline) were dropped then; nobody else is.
    round_phase_set(round_=round_, phase=Round.Phase.OPINIONS, deadline_seconds=experiment.opinion_seconds)
    return round_


"""The Habermas Machine protocol's own steps (docs/habermas-protocol.md).

Critiques need no service of their own: a critique round reuses the opinion phase (opinion_submit,
drafts, timers, dropouts), its Opinion rows are the critiques, and phases.round_finish opens it. Here:
positions before and after, the closing questions (the final preference between the first and the
revised statement), and the human mediator's statement.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from .. import events, selectors
from ..inputs import clean_text, visible_length
from ..models import Candidate, FinalPreference, Participant, Position, Presentation, Room, Round
from .errors import InvalidInput, WrongPhase
from .mediation import rating_open
from .phases import opinion_save_draft, round_phase_set
from .rating import _parse_likert

# A group statement is longer than one opinion; the human mediator's limit.
STATEMENT_MAX_CHARS = 2000
HUMAN_BACKEND = "human"


def _parse_position(position: object, strength: object) -> tuple[int, int]:
    return _parse_likert(position, what="position"), _parse_likert(strength, what="strength of your view")


def position_before_submit(*, participant: Participant, position: object, strength: object) -> Position:
    """A member's position on the question before writing their first opinion (the first answer counts)."""
    position_value, strength_value = _parse_position(position, strength)
    with transaction.atomic():
        # of=("self",): lock only this row. A plain FOR UPDATE also locks every joined row (room, experiment,
        # arm), and two services taking those rows in different orders can deadlock on PostgreSQL.
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment").get(pk=participant.pk)
        if not participant.room.experiment.ask_positions:
            raise InvalidInput("This study does not ask for your position.")
        round_ = Round.objects.current(room_id=participant.room_id)
        if round_.index != 0 or round_.phase not in (Round.Phase.WAITING, Round.Phase.OPINIONS):
            raise WrongPhase("Your position before the discussion can only be given before it.")
        if participant.has_left:
            raise WrongPhase("You were marked as having left this discussion.")
        existing = Position.objects.filter(participant=participant, stage=Position.Stage.BEFORE).first()
        if existing is not None:
            return existing
        given = Position.objects.create(
            participant=participant, round=round_, stage=Position.Stage.BEFORE, position=position_value, strength=strength_value
        )
        events.send_on_commit(events.RatingSubmitted(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))
    return given


def closing_submit(*, participant: Participant, preferred: object = None, position: object = None, strength: object = None) -> None:
    """After the last round: the final preference (first or revised statement) and the position after, as the
    experiment asks; then the member has finished and gets their code."""
    with transaction.atomic():
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment").get(pk=participant.pk)
        experiment = participant.room.experiment
        round_ = Round.objects.select_for_update().current(room_id=participant.room_id)
        if participant.has_finished:
            return
        if participant.has_left:
            raise WrongPhase("You were marked as having left this discussion.")
        if not (round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED and participant.pk in round_.ranked_ids()):
            raise WrongPhase("These questions come at the end of the discussion.")
        pair = selectors.closing_statements(round_=round_)
        if pair is not None:
            first, revised = pair
            try:
                preferred_id = int(str(preferred))
            except (TypeError, ValueError):
                raise InvalidInput("Please say which statement you prefer.") from None
            if preferred_id not in (first.pk, revised.pk):
                raise InvalidInput("Please choose one of the two statements.")
        if experiment.ask_positions:
            position_value, strength_value = _parse_position(position, strength)
            Position.objects.get_or_create(
                participant=participant,
                stage=Position.Stage.AFTER,
                defaults={"round": round_, "position": position_value, "strength": strength_value},
            )
        if pair is not None:
            FinalPreference.objects.get_or_create(
                participant=participant,
                defaults={
                    "first_candidate": first,
                    "revised_candidate": revised,
                    "preferred_id": preferred_id,
                    "revised_shown_first": selectors.closing_pair_order(participant=participant, round_=round_),
                },
            )
        participant.finished_at = timezone.now()
        participant.save(update_fields=["finished_at"])
        events.send_on_commit(events.ParticipantFinished(room_id=participant.room_id, round_id=round_.pk, participant_id=participant.pk))


def mediator_statement_submit(*, participant: Participant, text: str) -> Candidate:
    """The human mediator's group statement: stored as the round's one candidate (author recorded) and presented
    to the members in the same form and position as a model statement; the rating phase opens."""
    text = clean_text(text).strip()
    with transaction.atomic():
        participant = Participant.objects.select_for_update(of=("self",)).select_related("room__experiment", "room__arm").get(pk=participant.pk)
        experiment = participant.room.experiment
        if visible_length(text) < experiment.opinion_min_chars:
            raise InvalidInput(f"Please write at least {experiment.opinion_min_chars} characters.")
        if len(text) > STATEMENT_MAX_CHARS:
            raise InvalidInput(f"Please keep the statement under {STATEMENT_MAX_CHARS} characters (it has {len(text)}).")
        round_ = Round.objects.select_for_update(of=("self",)).select_related("room__arm").current(room_id=participant.room_id)
        if round_.mediator_id != participant.pk:
            raise WrongPhase("Only this round's mediator writes its statement.")
        existing = round_.candidates.filter(author__isnull=False).first()
        if existing is not None:
            return existing  # a double submit
        if round_.phase != Round.Phase.MEDIATING:
            raise WrongPhase("The statement is written once every opinion is in, before the time runs out.")
        writers = list(
            round_.opinions.filter(participant__dropped_out_at__isnull=True).order_by("participant_id").values_list("participant_id", flat=True)
        )
        candidate = Candidate.objects.create(
            round=round_,
            index=round_.candidates.count(),  # after the model's, in a head-to-head round where they came first
            text=text,
            backend=HUMAN_BACKEND,
            model_id=HUMAN_BACKEND,
            seed=round_.seed,
            opinion_order=writers,
            prompt="",
            completion_tokens=len(text.split()),
            latency_ms=(timezone.now() - round_.mediation_started_at).total_seconds() * 1000.0 if round_.mediation_started_at else 0.0,
            rank=1,
            shown=True,
            source_arm=round_.room.arm,
            author=participant,
        )
        Participant.objects.filter(pk=participant.pk).update(opinion_draft="")
        if round_.room.arm.compare_with_id is not None:
            # Human vs model side by side: rating opens once the model's statements are in too.
            model_shown = list(round_.candidates.filter(author__isnull=True, shown=True).order_by("rank").values_list("pk", flat=True))
            if model_shown:
                rating_open(round_=round_, rater_ids=writers, shown_ids=[candidate.pk, *model_shown])
            return candidate
        Presentation.objects.bulk_create(Presentation(participant_id=writer, candidate=candidate, position=0) for writer in writers)
        round_.progress_stage = Round.Stage.READY
        round_.progress_done = round_.progress_total = 1
        round_.rating_started_at = timezone.now()
        events.send_on_commit(events.CandidatesReady(room_id=round_.room_id, round_id=round_.pk))
        round_phase_set(round_=round_, phase=Round.Phase.RATING, deadline_seconds=experiment.rating_seconds)
    return candidate


def researcher_mediator_statement_submit(*, room: Room, researcher: Any, text: str) -> Candidate:
    """A researcher-mediated arm: the researcher (the view checked they may change the experiment) writes the current
    round's statement through the room's researcher seat, exactly as a member mediator would; who wrote it is kept."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update(of=("self",)).select_related("mediator").current(room_id=room.pk)
        seat = round_.mediator
        if seat is None or not seat.researcher_seat:
            raise WrongPhase("A researcher does not mediate this room.")
        candidate = mediator_statement_submit(participant=seat, text=text)
        Participant.objects.filter(pk=seat.pk, researcher__isnull=True).update(researcher=researcher)
    return candidate


def researcher_mediator_draft_save(*, room: Room, text: str) -> None:
    """Keep the researcher's draft on the seat, as a member mediator's is kept (a refused or reloaded page loses nothing)."""
    round_ = Round.objects.select_related("mediator").current(room_id=room.pk)
    if round_.mediator is not None and round_.mediator.researcher_seat:
        opinion_save_draft(participant=round_.mediator, text=text)

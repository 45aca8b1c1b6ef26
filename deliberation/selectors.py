"""Reads of deliberation state, shaped for the pages and partials that show them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from .models import (
    Candidate,
    Experiment,
    Opinion,
    Participant,
    PredictedAgreement,
    Presentation,
    Ranking,
    Rating,
    Room,
    Round,
)


@dataclass
class PresenceRow:
    label: str
    connected: bool
    is_you: bool
    has_opinion: bool
    finished: bool
    dropped_out: bool


@dataclass
class StatementRow:
    candidate_id: int
    position: int
    text: str
    agreement: int | None
    quality: int | None


@dataclass
class ParticipantState:
    participant: Participant
    room: Room
    round: Round
    experiment: Experiment
    question_text: str
    presence: list[PresenceRow]
    my_opinion: Opinion | None
    opinions_in: int
    opinions_expected: int
    statements: list[StatementRow] = field(default_factory=list)
    ranking: Ranking | None = None
    completion_code: str = ""

    @property
    def all_rated(self) -> bool:
        return bool(self.statements) and all(s.agreement is not None for s in self.statements)

    @property
    def view(self) -> str:
        """Which screen the participant sees: the round's phase, refined by what they have done."""
        if self.participant.finished_at is not None or self.round.phase == Round.Phase.DONE:
            return "done"
        if self.participant.dropped_out_at is not None:
            return "dropped"
        if self.round.phase == Round.Phase.OPINIONS and self.my_opinion is not None:
            return "opinion_sent"
        if self.round.phase == Round.Phase.RATING and not self.statements:
            return "not_rating"  # joined but wrote no opinion in time
        return self.round.phase

    def main_key(self) -> str:
        """Changes exactly when the participant's form area must be re-rendered."""
        rated = ",".join(f"{s.candidate_id}:{s.agreement}:{s.quality}" for s in self.statements)
        return f"{self.round.pk}:{self.view}:{rated}:{self.ranking.pk if self.ranking else ''}"


def participant_by_code(code: str) -> Participant | None:
    return (
        Participant.objects.select_related("room__experiment", "room__question", "room__arm")
        .filter(code=code)
        .first()
    )


def completion_code_for(participant: Participant) -> str:
    experiment = participant.room.experiment
    if experiment.completion_code:
        return experiment.completion_code
    digest = hashlib.sha256(f"{settings.SECRET_KEY}:{participant.code}".encode()).hexdigest()
    return f"C{digest[:8].upper()}"


def _presence(room: Room, round_: Round, you: Participant | None) -> list[PresenceRow]:
    writers = set(round_.opinions.values_list("participant_id", flat=True))
    return [
        PresenceRow(
            label=p.label,
            connected=p.connections > 0,
            is_you=you is not None and p.pk == you.pk,
            has_opinion=p.pk in writers,
            finished=p.finished_at is not None,
            dropped_out=p.dropped_out_at is not None,
        )
        for p in room.participants.order_by("id")
    ]


def room_state_for(participant: Participant) -> ParticipantState:
    participant = Participant.objects.select_related("room__experiment", "room__question", "room__arm").get(pk=participant.pk)
    room = participant.room
    round_ = room.rounds.order_by("-index").first()
    assert round_ is not None, "every room is created with its first round"
    my_opinion = round_.opinions.filter(participant=participant).first()
    state = ParticipantState(
        participant=participant,
        room=room,
        round=round_,
        experiment=room.experiment,
        question_text=room.question.text,
        presence=_presence(room, round_, participant),
        my_opinion=my_opinion,
        opinions_in=round_.opinions.count(),
        opinions_expected=room.participants.filter(dropped_out_at__isnull=True).count(),
    )
    if round_.phase in (Round.Phase.RATING, Round.Phase.DONE):
        ratings = {r.candidate_id: r for r in Rating.objects.filter(participant=participant, candidate__round=round_)}
        for presentation in Presentation.objects.filter(participant=participant, candidate__round=round_).select_related("candidate"):
            rating = ratings.get(presentation.candidate_id)
            state.statements.append(
                StatementRow(
                    candidate_id=presentation.candidate_id,
                    position=presentation.position + 1,
                    text=presentation.candidate.text,
                    agreement=rating.agreement if rating else None,
                    quality=rating.quality if rating else None,
                )
            )
        state.ranking = Ranking.objects.filter(participant=participant, round=round_).first()
    if participant.finished_at is not None or round_.phase == Round.Phase.DONE:
        state.completion_code = completion_code_for(participant)
    return state


# --- Researchers -------------------------------------------------------------------


def experiments_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Experiment]:
    if not user.is_authenticated:
        return Experiment.objects.none()
    if user.is_staff:
        return Experiment.objects.all().order_by("-created_at")
    return Experiment.objects.filter(owner=user).order_by("-created_at")


def can_monitor(user: AbstractBaseUser | AnonymousUser, room: Room) -> bool:
    return bool(user.is_authenticated and (user.is_staff or room.experiment.owner_id == user.pk))


@dataclass
class MonitorCandidate:
    candidate: Candidate
    predictions: list[float | None]  # one per participant column
    ratings: list[Rating | None]


@dataclass
class MonitorState:
    room: Room
    round: Round
    participants: list[Participant]
    opinions: dict[int, Opinion]
    candidates: list[MonitorCandidate]
    rankings: list[Ranking]
    rating_count: int
    explanation: str = ""


def monitor_state(room: Room) -> MonitorState:
    room = Room.objects.select_related("experiment", "arm", "question").get(pk=room.pk)
    round_ = room.rounds.order_by("-index").first()
    assert round_ is not None
    participants = list(room.participants.order_by("id"))
    column = {p.pk: i for i, p in enumerate(participants)}
    opinions = {o.participant_id: o for o in round_.opinions.all()}
    candidates = list(round_.candidates.order_by("rank", "index"))
    predictions: dict[int, list[float | None]] = {c.pk: [None] * len(participants) for c in candidates}
    for prediction in PredictedAgreement.objects.filter(candidate__round=round_):
        predictions[prediction.candidate_id][column[prediction.participant_id]] = prediction.score
    ratings: dict[int, list[Rating | None]] = {c.pk: [None] * len(participants) for c in candidates}
    for rating in Rating.objects.filter(candidate__round=round_):
        ratings[rating.candidate_id][column[rating.participant_id]] = rating
    rows = [MonitorCandidate(candidate=c, predictions=predictions[c.pk], ratings=ratings[c.pk]) for c in candidates]
    return MonitorState(
        room=room,
        round=round_,
        participants=participants,
        opinions=opinions,
        candidates=rows,
        rankings=list(round_.rankings.select_related("participant")),
        rating_count=sum(1 for row in rows for r in row.ratings if r is not None),
        explanation=_why_it_won(rows, room.arm.welfare_method),
    )


def _why_it_won(rows: list[MonitorCandidate], method: str) -> str:
    ranked = [row for row in rows if row.candidate.rank is not None]
    if len(ranked) < 1:
        return ""
    best = ranked[0]
    scores = [s for s in best.predictions if s is not None]
    text = (
        f"Statement #{best.candidate.index} has the highest {method} welfare "
        f"({best.candidate.welfare:.2f}); its worst-off member is predicted at {min(scores):.2f}"
        if scores and best.candidate.welfare is not None
        else ""
    )
    if len(ranked) > 1 and ranked[1].candidate.welfare is not None and best.candidate.welfare is not None:
        text += f", ahead of #{ranked[1].candidate.index} at {ranked[1].candidate.welfare:.2f}."
    return text


def rooms_for_experiment(experiment: Experiment) -> QuerySet[Room]:
    return experiment.rooms.select_related("arm", "question").prefetch_related("rounds").order_by("-id")

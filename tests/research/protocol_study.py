"""A played two-round Habermas Machine protocol, built row by row, for the analytics and export tests."""

from __future__ import annotations

from dataclasses import dataclass

from deliberation.models import Candidate, Experiment, FinalPreference, Participant, Position, Ranking, Rating, Room, Round
from tests.factories import ExperimentFactory, ParticipantFactory, RoomFactory


@dataclass
class ProtocolStudy:
    experiment: Experiment
    room: Room
    members: list[Participant]
    first: Round
    critique: Round
    first_statements: list[Candidate]
    revised: list[Candidate]


def build_protocol_study(slug: str = "analytics-protocol") -> ProtocolStudy:
    """Two members; round 0 shows two statements and both rank the second first (it wins); the critique round
    shows two revisions and both rank the first first. Agreement with the winners: member A 3 -> 6, member B
    5 -> 5. Positions: A 2 -> 3, B 6 -> 6. A prefers the revision, B the first statement."""
    experiment = ExperimentFactory(slug=slug, critique_rounds=1, ask_positions=True)
    room = RoomFactory(experiment=experiment)
    first = room.rounds.get(index=0)
    members = [ParticipantFactory(room=room, label=f"Participant {x}") for x in "AB"]
    first_statements = [
        Candidate.objects.create(round=first, index=i, text=f"first {i}", backend="t", model_id="m", seed=1, prompt="", shown=True, rank=i + 1)
        for i in range(2)
    ]
    for member in members:
        Ranking.objects.create(participant=member, round=first, order=[first_statements[1].pk, first_statements[0].pk])
        first.opinions.create(participant=member, text=f"opinion of {member.label}")
    Round.objects.filter(pk=first.pk).update(outcome=Round.Outcome.COMPLETED, phase=Round.Phase.DONE)
    critique = Round.objects.create(
        room=room, index=1, kind=Round.Kind.CRITIQUE, previous_winner=first_statements[1], outcome=Round.Outcome.COMPLETED, phase=Round.Phase.DONE
    )
    revised = [
        Candidate.objects.create(round=critique, index=i, text=f"revised {i}", backend="t", model_id="m", seed=1, prompt="", shown=True, rank=i + 1)
        for i in range(2)
    ]
    for member in members:
        Ranking.objects.create(participant=member, round=critique, order=[revised[0].pk, revised[1].pk])
        critique.opinions.create(participant=member, text=f"critique by {member.label}")
    for member, (old, new) in zip(members, [(3, 6), (5, 5)]):
        Rating.objects.create(participant=member, candidate=first_statements[1], agreement=old, quality=4)
        Rating.objects.create(participant=member, candidate=revised[0], agreement=new, quality=4)
    for member, (before, after) in zip(members, [(2, 3), (6, 6)]):
        Position.objects.create(participant=member, round=first, stage="before", position=before, strength=4)
        Position.objects.create(participant=member, round=critique, stage="after", position=after, strength=4)
    FinalPreference.objects.create(
        participant=members[0], first_candidate=first_statements[1], revised_candidate=revised[0], preferred=revised[0], revised_shown_first=True
    )
    FinalPreference.objects.create(
        participant=members[1], first_candidate=first_statements[1], revised_candidate=revised[0], preferred=first_statements[1],
        revised_shown_first=False,
    )
    return ProtocolStudy(experiment, room, members, first, critique, first_statements, revised)

"""Reads of deliberation state, shaped for the pages and partials that show them."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from modeling.likert import AGREEMENT_LABELS
from modeling.pipeline import demote_injected
from modeling.welfare import WELFARE_METHODS

from .models import (
    AttentionCheck,
    Candidate,
    Experiment,
    Opinion,
    OpinionRating,
    PairwisePreference,
    Participant,
    Position,
    PredictedAgreement,
    Presentation,
    Ranking,
    Rating,
    Release,
    Room,
    Round,
    Screen,
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
class PreferenceRow:
    """A head-to-head pair, named by the positions the participant saw the statements at."""

    candidate_a_id: int
    candidate_b_id: int
    position_a: int
    position_b: int
    preferred_id: int | None


@dataclass
class OpinionRow:
    opinion_id: int
    position: int
    text: str
    agreement: int | None


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
    preferences: list[PreferenceRow] = field(default_factory=list)
    opinions_to_rate: list[OpinionRow] = field(default_factory=list)
    attention_expected: int | None = None  # None: no attention item in this study
    attention_answered: bool = False
    released: bool = False
    # The Habermas Machine protocol (docs/habermas-protocol.md).
    position_due: bool = False  # the position before the first opinion is still to give
    has_ranked: bool = False  # this round's ranking is in (a critique round may follow)
    closing_due: bool = False  # the closing questions after the last round are still to answer
    previous_statement: str = ""  # a critique round: the statement the members critique
    # The closing page: the first and the revised statement, in this member's order, as (candidate id, text).
    closing_pair: list[tuple[int, str]] = field(default_factory=list)
    # The human mediator's page: the members' opinions (and critiques, in a critique round), anonymised.
    mediator_opinions: list[str] = field(default_factory=list)
    mediator_critiques: list[str] = field(default_factory=list)

    @property
    def attention_label(self) -> str:
        return AGREEMENT_LABELS.get(self.attention_expected or 0, "")

    @property
    def all_rated(self) -> bool:
        """Everything asked on the rating page is answered, so the final ranking may be given."""
        return (
            bool(self.statements)
            and all(s.agreement is not None for s in self.statements)
            and all(p.preferred_id is not None for p in self.preferences)
            and all(o.agreement is not None for o in self.opinions_to_rate)
            and (self.attention_expected is None or self.attention_answered)
        )

    @property
    def view(self) -> str:
        """Which screen the participant sees (the rule is Participant.screen)."""
        return self.participant.screen(
            round_=self.round,
            has_opinion=self.my_opinion is not None,
            has_statements=bool(self.statements),
            released=self.released,
            has_ranked=self.has_ranked,
            position_due=self.position_due,
            closing_due=self.closing_due,
        )

    def main_key(self) -> str:
        """Changes exactly when the participant's form area must be re-rendered."""
        rated = ",".join(f"{s.candidate_id}:{s.agreement}:{s.quality}" for s in self.statements)
        preferred = ",".join(str(p.preferred_id) for p in self.preferences)
        opinions = ",".join(str(o.agreement) for o in self.opinions_to_rate)
        # The human mediator's one screen shows different things by phase (waiting, writing, rated).
        phase = f":{self.round.phase}" if self.view == Screen.MEDIATOR else ""
        return (
            f"{self.round.pk}:{self.view}{phase}:{rated}:{preferred}:{opinions}:{self.attention_answered}:"
            f"{self.ranking.pk if self.ranking else ''}"
        )


def participant_by_code(code: str) -> Participant | None:
    return (
        Participant.objects.select_related("room__experiment", "room__question", "room__arm")
        .filter(code=code)
        .first()
    )


def completion_code_for(participant: Participant) -> str:
    """The code a participant is shown at the end: their release code if they were released, else their completion code."""
    release = Release.objects.filter(participant=participant).first()
    return release.code if release is not None else participant.completion_code()


def _presence(members: list[Participant], writers: set[int], you: Participant | None) -> list[PresenceRow]:
    return [
        PresenceRow(
            label=p.label,
            connected=p.connections > 0,
            is_you=you is not None and p.pk == you.pk,
            has_opinion=p.pk in writers,
            finished=p.finished_at is not None,
            dropped_out=p.dropped_out_at is not None,
        )
        for p in members
    ]


def room_state_for(participant: Participant) -> ParticipantState:
    # Every socket of the room re-reads this on every event, and building each query costs more CPU
    # than PostgreSQL spends answering it (docs/benchmarks.md, Load). So: one query for the members,
    # this participant among them, with the room's settings joined (a participant never changes
    # rooms); one for the round; one for the round's few opinions, from which the counts, who has
    # written and this participant's own opinion are derived (one opinion per participant and round).
    members = list(
        Participant.objects.filter(room_id=participant.room_id)
        .select_related("room__experiment", "room__question", "room__arm")
        .order_by("id")
    )
    me = next((member for member in members if member.pk == participant.pk), None)
    if me is None:
        raise Participant.DoesNotExist(f"participant {participant.pk} is no longer in room {participant.room_id}")
    participant = me
    room = participant.room
    round_ = room.rounds.order_by("-index").first()
    assert round_ is not None, "every room is created with its first round"
    opinions = list(round_.opinions.all())
    writers = {opinion.participant_id for opinion in opinions}
    state = ParticipantState(
        participant=participant,
        room=room,
        round=round_,
        experiment=room.experiment,
        question_text=room.question.text,
        # A human mediator is not listed to the members, so they rate the statement without knowing who wrote it.
        presence=_presence(
            [m for m in members if m.pk != round_.mediator_id or m.pk == participant.pk], writers, participant
        ),
        my_opinion=next((opinion for opinion in opinions if opinion.participant_id == participant.pk), None),
        opinions_in=len(writers),
        opinions_expected=sum(1 for member in members if member.dropped_out_at is None and member.pk != round_.mediator_id),
    )
    _add_protocol_steps(state, opinions=opinions)
    if round_.phase in (Round.Phase.RATING, Round.Phase.DONE):
        ratings = {r.candidate_id: r for r in Rating.objects.filter(participant=participant, candidate__round=round_)}
        source_arm_of: dict[int, int | None] = {}
        for presentation in Presentation.objects.filter(participant=participant, candidate__round=round_).select_related("candidate"):
            source_arm_of[presentation.candidate_id] = presentation.candidate.source_arm_id
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
        state.has_ranked = state.ranking is not None
        _add_protocol_items(state, source_arm_of=source_arm_of)
        _add_closing(state)
    # A release ends the round, so only a finished round can have one (saves a query per render).
    state.released = round_.phase == Round.Phase.DONE and Release.objects.filter(participant=participant).exists()
    # The code follows the screen: a participant recorded as dropped out is never given one.
    if state.view in (Screen.DONE, Screen.RELEASED):
        state.completion_code = completion_code_for(participant)
    return state


def _add_protocol_steps(state: ParticipantState, *, opinions: list[Opinion]) -> None:
    """The protocol's steps before rating: the position before, the critiqued statement, the mediator's material.
    Each reads only when its switch is on, so a study without them pays nothing per render."""
    round_, participant, experiment = state.round, state.participant, state.experiment
    if experiment.ask_positions and round_.index == 0 and round_.phase == Round.Phase.OPINIONS and state.my_opinion is None:
        state.position_due = not Position.objects.filter(participant=participant, stage=Position.Stage.BEFORE).exists()
    if round_.is_critique() and round_.previous_winner_id is not None:
        state.previous_statement = Candidate.objects.values_list("text", flat=True).get(pk=round_.previous_winner_id)
    if round_.mediator_id == participant.pk and round_.phase == Round.Phase.MEDIATING:
        # Anonymised, in a seeded order of the mediator's own; in a critique round each critique sits with its
        # author's opinion (the same pairing the model's revision prompt uses).
        writers = [o for o in opinions if o.participant_id != participant.pk]
        _participant_draw(round_, participant, "mediator").shuffle(writers)
        if round_.is_critique():
            first = dict(Opinion.objects.filter(round__room_id=round_.room_id, round__index=0).values_list("participant_id", "text"))
            state.mediator_opinions = [first.get(o.participant_id, "") for o in writers]
            state.mediator_critiques = [o.text for o in writers]
        else:
            state.mediator_opinions = [o.text for o in writers]


def _add_closing(state: ParticipantState) -> None:
    """After the last round: the final preference (a critique round was played) and the position after."""
    round_, participant = state.round, state.participant
    if not (round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED and state.has_ranked):
        return
    if participant.has_finished or participant.has_left:
        return
    pair = closing_statements(round_=round_)
    if pair is None and not state.experiment.ask_positions:
        return
    state.closing_due = True
    if pair is not None:
        first, revised = pair
        ordered = [revised, first] if closing_pair_order(participant=participant, round_=round_) else [first, revised]
        state.closing_pair = [(candidate.pk, candidate.text) for candidate in ordered]


def closing_pair_order(*, participant: Participant, round_: Round) -> bool:
    """Whether this member sees the revised statement first in the final preference (a seeded draw per member)."""
    return _participant_draw(round_, participant, "final-preference").random() < 0.5


def closing_statements(*, round_: Round) -> tuple[Candidate, Candidate] | None:
    """(the first round's winning statement, the last round's), when the last round was a critique round."""
    if not round_.is_critique():
        return None
    first_round = Round.objects.get(room_id=round_.room_id, index=0)
    first, revised = first_round.winning_candidate(), round_.winning_candidate()
    if first is None or revised is None:
        return None
    return first, revised


def _participant_draw(round_: Round, participant: Participant, purpose: str) -> random.Random:
    # Deterministic per participant and round, so what they were shown can be reproduced.
    digest = hashlib.sha256(f"{round_.seed}:{participant.pk}:{purpose}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def preference_pairs(*, participant: Participant, round_: Round) -> list[tuple[int, int]]:
    """Head-to-head pairs: each shown statement paired with each shown statement of the other arm, in the order seen."""
    presented: list[tuple[int, int | None]] = list(
        Presentation.objects.filter(participant=participant, candidate__round=round_)
        .order_by("position")
        .values_list("candidate_id", "candidate__source_arm_id")
    )
    return _pairs_across_arms(presented)


def _pairs_across_arms(presented: list[tuple[int, int | None]]) -> list[tuple[int, int]]:
    """(candidate id, source arm id) in the order seen -> the pairs of statements from different arms."""
    return [
        (first_id, second_id)
        for i, (first_id, first_arm) in enumerate(presented)
        for second_id, second_arm in presented[i + 1 :]
        if first_arm is not None and second_arm is not None and first_arm != second_arm
    ]


def opinions_to_rate(*, participant: Participant, round_: Round) -> list[Opinion]:
    """The other members' opinions, in an order of the participant's own (their authors are not shown)."""
    if not participant.room.experiment.rate_opinions:
        return []
    others = list(round_.opinions.exclude(participant=participant).order_by("id"))
    _participant_draw(round_, participant, "opinions").shuffle(others)
    return others


def attention_expected(*, participant: Participant, round_: Round) -> int:
    """The answer the instructed-response item asks this participant to pick (never the midpoint)."""
    return _participant_draw(round_, participant, "attention").choice([1, 2, 3, 5, 6, 7])


@dataclass
class ProtocolTodo:
    preference_pairs: list[tuple[int, int]]
    opinion_ids: list[int]
    attention_check: bool


def protocol_todo(*, participant: Participant, round_: Round) -> ProtocolTodo:
    """What the participant still has to answer on the rating page, beyond rating the statements."""
    done_pairs = set(PairwisePreference.objects.filter(participant=participant, round=round_).values_list("candidate_a_id", "candidate_b_id"))
    rated_opinions = set(OpinionRating.objects.filter(participant=participant).values_list("opinion_id", flat=True))
    return ProtocolTodo(
        preference_pairs=[pair for pair in preference_pairs(participant=participant, round_=round_) if tuple(sorted(pair)) not in done_pairs],
        opinion_ids=[o.pk for o in opinions_to_rate(participant=participant, round_=round_) if o.pk not in rated_opinions],
        attention_check=participant.room.experiment.attention_check
        and not AttentionCheck.objects.filter(participant=participant, round=round_).exists(),
    )


def _add_protocol_items(state: ParticipantState, *, source_arm_of: dict[int, int | None]) -> None:
    participant, round_ = state.participant, state.round
    if not state.statements:
        return  # not a rater in this round
    position_of = {s.candidate_id: s.position for s in state.statements}
    # Every socket re-reads this on every event: the pairs come from the presentations already read
    # (statements are in the order seen), and the answers are only read when there are pairs to answer.
    pairs = _pairs_across_arms([(s.candidate_id, source_arm_of.get(s.candidate_id)) for s in state.statements])
    chosen = {
        (p.candidate_a_id, p.candidate_b_id): p.preferred_id
        for p in PairwisePreference.objects.filter(participant=participant, round=round_)
    } if pairs else {}
    for first, second in pairs:
        state.preferences.append(
            PreferenceRow(
                candidate_a_id=first,
                candidate_b_id=second,
                position_a=position_of[first],
                position_b=position_of[second],
                preferred_id=chosen.get((min(first, second), max(first, second))),
            )
        )
    given = (
        dict(OpinionRating.objects.filter(participant=participant, opinion__round=round_).values_list("opinion_id", "agreement"))
        if state.experiment.rate_opinions  # otherwise there are no opinions to rate (opinions_to_rate)
        else {}
    )
    for position, opinion in enumerate(opinions_to_rate(participant=participant, round_=round_), start=1):
        state.opinions_to_rate.append(OpinionRow(opinion_id=opinion.pk, position=position, text=opinion.text, agreement=given.get(opinion.pk)))
    if state.experiment.attention_check:
        state.attention_expected = attention_expected(participant=participant, round_=round_)
        state.attention_answered = AttentionCheck.objects.filter(participant=participant, round=round_).exists()


# --- The room monitor (researchers) -------------------------------------------------


@dataclass
class MonitorCandidate:
    candidate: Candidate
    predictions: list[float | None]  # one per participant column
    ratings: list[Rating | None]
    # Welfare of this candidate under every welfare function, from the predicted agreement.
    welfare_by_method: list[float | None] = field(default_factory=list)


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
    welfare_methods: list[str] = field(default_factory=list)
    # Each ranking as (participant label, statement numbers best first), in the "#" of the tables.
    ranking_rows: list[tuple[str, list[int]]] = field(default_factory=list)


def monitor_state(room: Room) -> MonitorState:
    room = Room.objects.select_related("experiment", "arm", "question").get(pk=room.pk)
    round_ = room.rounds.order_by("-index").first()
    assert round_ is not None
    participants = list(room.participants.order_by("id"))
    column = {p.pk: i for i, p in enumerate(participants)}
    opinions = {o.participant_id: o for o in round_.opinions.all()}
    candidates = list(round_.candidates.order_by("rank", "index"))
    predictions: dict[int, list[float | None]] = {c.pk: [None] * len(participants) for c in candidates}
    reward_models: set[str] = set()
    for prediction in PredictedAgreement.objects.filter(candidate__round=round_):
        predictions[prediction.candidate_id][column[prediction.participant_id]] = prediction.score
        reward_models.add(prediction.reward_model)
    ratings: dict[int, list[Rating | None]] = {c.pk: [None] * len(participants) for c in candidates}
    for rating in Rating.objects.filter(candidate__round=round_):
        ratings[rating.candidate_id][column[rating.participant_id]] = rating
    rows = [MonitorCandidate(candidate=c, predictions=predictions[c.pk], ratings=ratings[c.pk]) for c in candidates]
    rankings = list(round_.rankings.select_related("participant"))
    index_of = {c.pk: c.index for c in candidates}
    return MonitorState(
        room=room,
        round=round_,
        participants=participants,
        opinions=opinions,
        candidates=rows,
        rankings=rankings,
        ranking_rows=[(r.participant.label, [index_of[cid] for cid in r.order if cid in index_of]) for r in rankings],
        rating_count=sum(1 for row in rows for r in row.ratings if r is not None),
        explanation=" ".join(
            part
            for part in (
                _explain_ranking(rows, participants, room.arm.welfare_method, room.arm.welfare_alpha, reward_models),
                _explain_demotion(rows, [o.text for o in opinions.values()]),
            )
            if part
        ),
        welfare_methods=list(MONITOR_WELFARE_METHODS),
    )


# The columns of the monitor's welfare table: every registered welfare function, in registry order.
MONITOR_WELFARE_METHODS = tuple(WELFARE_METHODS)


def _explain_demotion(rows: list[MonitorCandidate], opinion_texts: list[str]) -> str:
    """Why a statement the welfare function preferred is ranked last: it repeats an injected instruction
    (modeling.pipeline.demote_injected, applied when the round was mediated)."""
    _, demoted = demote_injected([row.candidate for row in rows], opinion_texts, list(range(len(rows))))
    if not demoted:
        return ""
    labels = ", ".join(f"#{rows[i].candidate.index}" for i in demoted)
    return (
        f"Ranked after all others whatever their welfare: {labels}, which repeat an instruction "
        "an opinion tried to give the mediator."
    )


def _explain_ranking(
    rows: list[MonitorCandidate], participants: list[Participant], method: str, alpha: float, reward_models: set[str]
) -> str:
    """Fill every row's welfare under each function, and say why the arm's function chose its winner."""
    from modeling.reward.registry import reward_model_is_informative
    from modeling.welfare import explain_choice, rank_candidates

    if not rows:
        return ""

    # Members the reward model scored (an excluded member of an ablation arm has no predictions).
    scored = [i for i in range(len(participants)) if all(row.predictions[i] is not None for row in rows)]
    if not scored:
        return ""
    matrix = [[float(row.predictions[i]) for row in rows] for i in scored]  # type: ignore[arg-type]
    for name in MONITOR_WELFARE_METHODS:
        result = rank_candidates(matrix, method=name, alpha=alpha)
        for row, value in zip(rows, result.welfare):
            row.welfare_by_method.append(value)
    if reward_models and not any(reward_model_is_informative(name) for name in reward_models):
        # A constant prediction ties every candidate: "won on 4.00 vs 4.00" would explain nothing.
        return (
            f"No reward model ({', '.join(sorted(reward_models))}): every statement has the same predicted agreement, "
            "so none won on welfare; the tie-break (the order they were written in) chose the statements shown."
        )
    chosen = rank_candidates(matrix, method=method, alpha=alpha)
    return explain_choice(
        matrix,
        chosen,
        candidate_labels=[f"#{row.candidate.index}" for row in rows],
        participant_labels=[participants[i].label for i in scored],
    )

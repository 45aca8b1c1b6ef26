"""Figures of the Habermas Machine protocol (Tessler et al. 2024; docs/habermas-protocol.md).

On plain rows, so each figure can be checked against a hand computation (tests/research/test_analytics_protocol.py);
`load_protocol(experiment)` reads them from the database.

- Agreement with the revised vs the first statement: each member's agreement (1–7) with the last critique
  round's winner minus their agreement with the first round's winner. Members of one group are not
  independent, so the group is the unit: differences are averaged within each group, and the interval is a
  Student t interval over the group means (paired, as each group rated both).
- Share preferring the revision: the members' final preferences, with a Wilson score interval.
- Positions (1 negating ... 7 affirming): movement toward the group statement, and the spread between
  members before and after. The statement has no position of its own, so its position is estimated from the
  members': their before-positions weighted by how much each agrees with the final statement (agreement − 1,
  so a member who strongly disagrees adds nothing). Movement is |before − s| − |after − s| (positive: closer).
  Spread is the mean absolute deviation of a group's positions from the group's mean. Both per group, then a
  t interval over groups.
- AI vs human mediator: agreement with the final statement of a model-mediated group minus that of a
  human-mediated group (group means; Welch t interval); and, where a human-mediator arm is compared with a model
  arm in the same round (head-to-head), the share of pairwise choices won by the model's statement (Wilson).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from scipy import stats

from deliberation.models import Candidate, Experiment, FinalPreference, PairwisePreference, Position, Rating, Round

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float | None
    low: float | None
    high: float | None
    n: int  # the units the interval is over (groups, or members for a share)


EMPTY = Interval(None, None, None, 0)


def t_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student t interval (one sample, or paired differences)."""
    n = len(values)
    if n == 0:
        return EMPTY
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def welch_interval(first: Sequence[float], second: Sequence[float], *, confidence: float = CONFIDENCE) -> Interval:
    """mean(first) − mean(second), with the Welch–Satterthwaite t interval."""
    n1, n2 = len(first), len(second)
    if n1 == 0 or n2 == 0:
        return EMPTY
    m1, m2 = sum(first) / n1, sum(second) / n2
    if n1 < 2 or n2 < 2:
        return Interval(m1 - m2, None, None, n1 + n2)
    v1 = sum((v - m1) ** 2 for v in first) / (n1 - 1) / n1
    v2 = sum((v - m2) ** 2 for v in second) / (n2 - 1) / n2
    if v1 + v2 == 0:
        return Interval(m1 - m2, m1 - m2, m1 - m2, n1 + n2)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * math.sqrt(v1 + v2)
    return Interval(m1 - m2, m1 - m2 - half, m1 - m2 + half, n1 + n2)


def wilson_interval(successes: int, n: int, *, confidence: float = CONFIDENCE) -> Interval:
    if n == 0:
        return EMPTY
    z = float(stats.norm.ppf((1 + confidence) / 2))
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(share, centre - half, centre + half, n)


# --- Rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevisionPair:
    """One member's agreement with their group's first and revised winning statements."""

    group_id: int
    participant_id: int
    first_agreement: int
    revised_agreement: int


@dataclass(frozen=True)
class MemberPositions:
    group_id: int
    participant_id: int
    before: int
    after: int
    # Agreement (1–7) with the group's final statement (the last round's winner); None if not rated.
    final_agreement: int | None


@dataclass(frozen=True)
class GroupOutcome:
    """A group's agreement with its final statement, by who mediated it."""

    group_id: int
    human_mediated: bool
    agreements: tuple[int, ...]


@dataclass
class ProtocolData:
    revision_pairs: list[RevisionPair] = field(default_factory=list)
    prefers_revision: list[bool] = field(default_factory=list)
    positions: list[MemberPositions] = field(default_factory=list)
    outcomes: list[GroupOutcome] = field(default_factory=list)
    # Head-to-head (a human-mediator arm compared with a model arm): per pairwise choice, was the model's preferred?
    ai_over_human: list[bool] = field(default_factory=list)


# --- Figures -------------------------------------------------------------------------------------


def revision_agreement_difference(pairs: Sequence[RevisionPair]) -> Interval:
    """Mean (revised − first) agreement, averaged within groups, t interval over groups (paired)."""
    per_group: dict[int, list[int]] = defaultdict(list)
    for pair in pairs:
        per_group[pair.group_id].append(pair.revised_agreement - pair.first_agreement)
    return t_interval([sum(d) / len(d) for d in per_group.values()])


def revision_preference_share(prefers_revision: Sequence[bool]) -> Interval:
    return wilson_interval(sum(prefers_revision), len(prefers_revision))


def statement_position(members: Sequence[MemberPositions]) -> float | None:
    """The group statement's estimated position: before-positions weighted by agreement − 1 with it."""
    weights = [(m.before, (m.final_agreement or 1) - 1) for m in members]
    total = sum(w for _, w in weights)
    if total == 0:
        return None
    return sum(position * w for position, w in weights) / total


def _spread(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum(abs(v - mean) for v in values) / len(values)


@dataclass(frozen=True)
class PositionFigures:
    movement_toward_statement: Interval  # positive: positions moved toward the group statement
    spread_before: Interval
    spread_after: Interval
    spread_change: Interval  # after − before (negative: the group converged), paired over groups


def position_figures(members: Sequence[MemberPositions]) -> PositionFigures:
    groups: dict[int, list[MemberPositions]] = defaultdict(list)
    for member in members:
        groups[member.group_id].append(member)
    movements, before, after, change = [], [], [], []
    for rows in groups.values():
        target = statement_position(rows)
        if target is not None:
            movements.append(sum(abs(m.before - target) - abs(m.after - target) for m in rows) / len(rows))
        if len(rows) >= 2:
            spread_before, spread_after = _spread([m.before for m in rows]), _spread([m.after for m in rows])
            before.append(spread_before)
            after.append(spread_after)
            change.append(spread_after - spread_before)
    return PositionFigures(t_interval(movements), t_interval(before), t_interval(after), t_interval(change))


def ai_vs_human_agreement(outcomes: Sequence[GroupOutcome]) -> Interval:
    """Mean agreement with the final statement: model-mediated groups minus human-mediated ones (Welch)."""
    model = [sum(o.agreements) / len(o.agreements) for o in outcomes if not o.human_mediated and o.agreements]
    human = [sum(o.agreements) / len(o.agreements) for o in outcomes if o.human_mediated and o.agreements]
    return welch_interval(model, human)


def ai_preference_share(ai_over_human: Sequence[bool]) -> Interval:
    """Share of head-to-head choices between a model and a human mediator's statement won by the model (Wilson)."""
    return wilson_interval(sum(ai_over_human), len(ai_over_human))


@dataclass(frozen=True)
class ProtocolReport:
    revised_minus_first_agreement: Interval
    share_preferring_revision: Interval
    positions: PositionFigures
    ai_minus_human_agreement: Interval
    share_preferring_ai: Interval


def protocol_report(data: ProtocolData) -> ProtocolReport:
    return ProtocolReport(
        revised_minus_first_agreement=revision_agreement_difference(data.revision_pairs),
        share_preferring_revision=revision_preference_share(data.prefers_revision),
        positions=position_figures(data.positions),
        ai_minus_human_agreement=ai_vs_human_agreement(data.outcomes),
        share_preferring_ai=ai_preference_share(data.ai_over_human),
    )


# --- From the database -----------------------------------------------------------------------------


def load_protocol(experiment: Experiment) -> ProtocolData:
    """The rows above for one experiment: completed rounds only; each group's first and last completed rounds."""
    data = ProtocolData()
    rounds: dict[int, list[Round]] = defaultdict(list)
    for round_ in Round.objects.filter(room__experiment=experiment, outcome=Round.Outcome.COMPLETED).order_by("room_id", "index"):
        rounds[round_.room_id].append(round_)
    agreement: dict[tuple[int, int], int] = {
        (participant_id, candidate_id): value
        for participant_id, candidate_id, value in Rating.objects.filter(participant__room__experiment=experiment).values_list(
            "participant_id", "candidate_id", "agreement"
        )
    }
    positions: dict[int, dict[str, int]] = defaultdict(dict)
    for participant_id, stage, position in Position.objects.filter(participant__room__experiment=experiment).values_list(
        "participant_id", "stage", "position"
    ):
        positions[participant_id][stage] = position
    for room_id, played in rounds.items():
        first, last = played[0], played[-1]
        first_winner, last_winner = first.winning_candidate(), last.winning_candidate()
        if last_winner is None:
            continue
        raters = sorted(last.ranked_ids())
        if first_winner is not None and last.index > 0:
            for participant_id in raters:
                if (participant_id, first_winner.pk) in agreement and (participant_id, last_winner.pk) in agreement:
                    data.revision_pairs.append(
                        RevisionPair(room_id, participant_id, agreement[(participant_id, first_winner.pk)], agreement[(participant_id, last_winner.pk)])
                    )
        for participant_id in raters:
            stages = positions.get(participant_id, {})
            if Position.Stage.BEFORE in stages and Position.Stage.AFTER in stages:
                data.positions.append(
                    MemberPositions(
                        room_id, participant_id, stages[Position.Stage.BEFORE], stages[Position.Stage.AFTER],
                        agreement.get((participant_id, last_winner.pk)),
                    )
                )
        final = tuple(agreement[(p, last_winner.pk)] for p in raters if (p, last_winner.pk) in agreement)
        data.outcomes.append(GroupOutcome(room_id, last.mediator_id is not None, final))
    human_written = set(Candidate.objects.filter(round__room__experiment=experiment, author__isnull=False).values_list("pk", flat=True))
    for a_id, b_id, preferred in PairwisePreference.objects.filter(round__room__experiment=experiment).values_list(
        "candidate_a_id", "candidate_b_id", "preferred_id"
    ):
        if (a_id in human_written) != (b_id in human_written):  # a human statement against a model's
            data.ai_over_human.append(preferred not in human_written)
    data.prefers_revision = [
        preference.prefers_revision for preference in FinalPreference.objects.filter(participant__room__experiment=experiment).order_by("id")
    ]
    return data


# --- On the researcher's analytics page and in its CSV ------------------------------------------------


def uses_protocol(experiment: Experiment) -> bool:
    """The experiment runs a step of the protocol: critique rounds, positions, or a human-mediator arm.

    Asked before anything is loaded, so the analytics page of a plain experiment costs one small query."""
    return experiment.critique_rounds > 0 or experiment.ask_positions or experiment.arms.filter(human_mediator=True).exists()


def report_for(experiment: Experiment) -> ProtocolReport | None:
    """The protocol's figures, or None (without loading a row) when the experiment does not use the protocol."""
    return protocol_report(load_protocol(experiment)) if uses_protocol(experiment) else None


@dataclass(frozen=True)
class ProtocolRow:
    key: str  # the metric's name in the CSV
    label: str
    unit: str  # what n counts (singular; the page pluralises)
    interval: Interval


def protocol_rows(report: ProtocolReport) -> list[ProtocolRow]:
    """The figures in the order the page and the CSV show them."""
    positions = report.positions
    return [
        ProtocolRow("revised_minus_first_agreement", "Agreement: revised − first statement (paired, per group)", "group",
                    report.revised_minus_first_agreement),
        ProtocolRow("share_preferring_revision", "Share preferring the revision (final preference)", "member", report.share_preferring_revision),
        ProtocolRow("position_movement_toward_statement", "Positions: movement toward the group statement (positive: closer)", "group",
                    positions.movement_toward_statement),
        ProtocolRow("position_spread_before", "Positions: spread within the group, before", "group", positions.spread_before),
        ProtocolRow("position_spread_after", "Positions: spread within the group, after", "group", positions.spread_after),
        ProtocolRow("position_spread_change", "Positions: spread after − before (negative: converged)", "group", positions.spread_change),
        ProtocolRow("ai_minus_human_agreement", "Agreement with the final statement: AI − human mediator (Welch)", "group",
                    report.ai_minus_human_agreement),
        ProtocolRow("share_preferring_ai", "Side by side: share of choices for the AI's statement over the human's", "choice",
                    report.share_preferring_ai),
    ]


def protocol_csv_rows(report: ProtocolReport) -> list[list[str | int]]:
    """Rows in the analytics CSV's columns (exclusions, kind, arm_id, arm, other_arm, metric, value, ci_low, ci_high,
    n_groups, p_value, p_holm): kind "protocol", no exclusion rule applied, n in the row's own unit (metric `<key>`;
    the unit is in docs/habermas-protocol.md)."""

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.6g}"

    return [
        ["none", "protocol", "", "", "", row.key, cell(row.interval.estimate), cell(row.interval.low), cell(row.interval.high), row.interval.n, "", ""]
        for row in protocol_rows(report)
    ]

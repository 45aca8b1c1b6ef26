"""Per-arm analytics of an experiment, from the ratings collected so far.

docs/analytics.md defines every figure. In short, per arm (the arm whose configuration wrote a
statement; in head-to-head rounds two arms write statements in the same group):

- mean agreement: the mean of all agreement ratings (1-7) of the arm's shown statements;
- worst-off agreement: per statement, the lowest agreement any rater gave it; averaged over statements;
- divisiveness: per statement, the mean absolute difference between two raters' agreement, over all
  pairs of its raters; averaged over statements with at least two raters;
- win rate against the best human opinion: per group of the arm, its top-ranked shown statement
  against the other members' best-rated opinion (rated by the same people); a win scores 1, a tie 1/2;
- head-to-head win rate: the share of pairwise preferences between the arm's statement and another
  arm's that went to the arm;
- exclusion effect: per group of an exclusion arm, the excluded member's mean agreement minus the
  included members' mean agreement (the paper reports -0.47);
- reward-model accuracy: predicted against rated agreement (MAE, within-participant Spearman,
  pairwise accuracy), with modeling.reward.metrics.

Every estimate carries a 95% percentile bootstrap interval that resamples groups (rooms), since
ratings within a group are not independent; the bootstrap is seeded from the experiment's recorded
seed, so the page shows the same interval every time for the same data.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TypeVar

import numpy as np
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from deliberation.models import Arm, Experiment, OpinionRating, PairwisePreference, PredictedAgreement, Rating, Round
from modeling.reward.metrics import mae, mean_within_participant_spearman, pairwise_accuracy

from .exports import spreadsheet_safe

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

G = TypeVar("G")


# --- Plain rows (what the figures are computed from) ----------------------------------------------


@dataclass(frozen=True)
class StatementRating:
    room_id: int
    candidate_id: int
    source_arm_id: int
    room_arm_id: int
    participant_id: int
    agreement: int
    quality: int
    welfare_rank: int | None
    predicted: float | None


@dataclass(frozen=True)
class OpinionEndorsement:
    room_id: int
    opinion_id: int
    author_id: int
    rater_id: int
    agreement: int


@dataclass(frozen=True)
class Preference:
    room_id: int
    arm_a_id: int
    arm_b_id: int
    preferred_arm_id: int


@dataclass
class StudyData:
    ratings: list[StatementRating]
    opinion_ratings: list[OpinionEndorsement]
    preferences: list[Preference]
    excluded: dict[int, int]  # room id -> excluded participant id


# --- Estimates and the bootstrap -------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0  # groups the estimate is computed from

    @property
    def available(self) -> bool:
        return self.value is not None


def bootstrap_ci(
    groups: Sequence[G], statistic: Callable[[Sequence[G]], float | None], *, seed: Sequence[int],
    resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
) -> tuple[float | None, float | None]:
    """Percentile interval of `statistic` over groups resampled with replacement (seeded, so reproducible)."""
    if not groups:
        return None, None
    rng = np.random.default_rng(list(seed))
    values = []
    for _ in range(resamples):
        picks = rng.integers(0, len(groups), size=len(groups))
        value = statistic([groups[i] for i in picks])
        if value is not None:
            values.append(value)
    if not values:
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _estimate(groups: Sequence[G], statistic: Callable[[Sequence[G]], float | None], seed: Sequence[int]) -> Estimate:
    value = statistic(groups) if groups else None
    if value is None:
        return Estimate(value=None, n=len(groups))
    low, high = bootstrap_ci(groups, statistic, seed=seed)
    return Estimate(value=value, low=low, high=high, n=len(groups))


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


# --- The figures, on plain rows ----------------------------------------------------------------------


def _by_room(rows: Sequence[StatementRating]) -> list[list[StatementRating]]:
    rooms: dict[int, list[StatementRating]] = defaultdict(list)
    for row in rows:
        rooms[row.room_id].append(row)
    return [rooms[room_id] for room_id in sorted(rooms)]


def _by_statement(groups: Sequence[list[StatementRating]]) -> list[list[int]]:
    """Agreement ratings per statement; a group resampled twice counts its statements twice."""
    statements: list[list[int]] = []
    for group in groups:
        per: dict[int, list[int]] = defaultdict(list)
        for row in group:
            per[row.candidate_id].append(row.agreement)
        statements += [per[c] for c in sorted(per)]
    return statements


def mean_agreement(groups: Sequence[list[StatementRating]]) -> float | None:
    return _mean([row.agreement for group in groups for row in group])


def mean_quality(groups: Sequence[list[StatementRating]]) -> float | None:
    return _mean([row.quality for group in groups for row in group])


def worst_off_agreement(groups: Sequence[list[StatementRating]]) -> float | None:
    return _mean([min(ratings) for ratings in _by_statement(groups)])


def statement_divisiveness(ratings: Sequence[int]) -> float | None:
    """Mean absolute difference of agreement over all pairs of raters (None with fewer than two)."""
    pairs = list(combinations(ratings, 2))
    return _mean([abs(a - b) for a, b in pairs]) if pairs else None


def divisiveness(groups: Sequence[list[StatementRating]]) -> float | None:
    per_statement = [statement_divisiveness(ratings) for ratings in _by_statement(groups)]
    return _mean([d for d in per_statement if d is not None])


def best_opinion_outcome(statement_rows: Sequence[StatementRating], opinion_rows: Sequence[OpinionEndorsement]) -> float | None:
    """One group: 1 if its top-ranked shown statement beats the best-rated member opinion, 1/2 a tie, 0 a loss.

    The best opinion is the one with the highest mean agreement from the members other than its author
    (ties: the earliest opinion). The statement's score is the mean agreement of those same raters, so
    both are judged by the same people.
    """
    ranked = [row for row in statement_rows if row.welfare_rank is not None]
    if not ranked or not opinion_rows:
        return None
    top_rank = min(row.welfare_rank for row in ranked if row.welfare_rank is not None)
    top = {row.participant_id: row.agreement for row in ranked if row.welfare_rank == top_rank}
    endorsements: dict[int, dict[int, int]] = defaultdict(dict)
    authors: dict[int, int] = {}
    for row in opinion_rows:
        endorsements[row.opinion_id][row.rater_id] = row.agreement
        authors[row.opinion_id] = row.author_id
    best_id = max(sorted(endorsements), key=lambda o: _mean(list(endorsements[o].values())) or 0)
    raters = [r for r in endorsements[best_id] if r in top]
    if not raters:
        return None
    opinion_score = _mean([endorsements[best_id][r] for r in raters])
    statement_score = _mean([top[r] for r in raters])
    assert opinion_score is not None and statement_score is not None
    return 1.0 if statement_score > opinion_score else 0.5 if statement_score == opinion_score else 0.0


def exclusion_difference(rows: Sequence[StatementRating], excluded_id: int) -> float | None:
    """One group: the excluded member's mean agreement minus the mean of the included members' means."""
    per_member: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        per_member[row.participant_id].append(row.agreement)
    if excluded_id not in per_member:
        return None
    included = [_mean(values) for member, values in per_member.items() if member != excluded_id]
    if not included:
        return None
    excluded_mean = _mean(per_member[excluded_id])
    assert excluded_mean is not None
    return excluded_mean - math.fsum(v for v in included if v is not None) / len(included)


# --- Per-arm report -----------------------------------------------------------------------------------


@dataclass
class RewardAccuracy:
    mae: float | None
    spearman: float | None
    pairwise_accuracy: float | None
    rows: int
    pairs: int


@dataclass
class ArmReport:
    arm_id: int
    name: str
    welfare_method: str
    protocols: list[str]
    groups: int
    ratings: int
    mean_agreement: Estimate
    worst_off_agreement: Estimate
    divisiveness: Estimate
    mean_quality: Estimate
    win_rate_vs_best_opinion: Estimate
    head_to_head_win_rate: Estimate
    head_to_head_opponents: list[str]
    exclusion_effect: Estimate
    excluded_mean_agreement: float | None
    included_mean_agreement: float | None
    reward_model: RewardAccuracy


@dataclass
class ExperimentReport:
    experiment: Experiment
    arms: list[ArmReport] = field(default_factory=list)

    METRICS = [
        ("mean_agreement", "Mean agreement (1–7)"),
        ("worst_off_agreement", "Worst-off member's agreement (1–7)"),
        ("divisiveness", "Divisiveness (mean |difference| between raters)"),
        ("mean_quality", "Mean quality (1–7)"),
        ("win_rate_vs_best_opinion", "Win rate vs best human opinion"),
        ("head_to_head_win_rate", "Head-to-head win rate"),
        ("exclusion_effect", "Exclusion effect (excluded − included)"),
    ]


def load_study(experiment: Experiment) -> StudyData:
    predictions = {
        (c, p): s
        for c, p, s in PredictedAgreement.objects.filter(candidate__round__room__experiment=experiment).values_list(
            "candidate_id", "participant_id", "score"
        ).iterator(chunk_size=5000)
    }
    ratings = [
        StatementRating(
            room_id=room_id, candidate_id=candidate_id, source_arm_id=source_arm_id or room_arm_id, room_arm_id=room_arm_id,
            participant_id=participant_id, agreement=agreement, quality=quality, welfare_rank=rank,
            predicted=predictions.get((candidate_id, participant_id)),
        )
        for room_id, candidate_id, source_arm_id, room_arm_id, participant_id, agreement, quality, rank in Rating.objects.filter(
            candidate__round__room__experiment=experiment
        ).values_list(
            "candidate__round__room_id", "candidate_id", "candidate__source_arm_id", "candidate__round__room__arm_id",
            "participant_id", "agreement", "quality", "candidate__rank",
        ).order_by("id").iterator(chunk_size=5000)
    ]
    opinion_ratings = [
        OpinionEndorsement(room_id=room_id, opinion_id=opinion_id, author_id=author_id, rater_id=rater_id, agreement=agreement)
        for room_id, opinion_id, author_id, rater_id, agreement in OpinionRating.objects.filter(
            opinion__round__room__experiment=experiment
        ).values_list("opinion__round__room_id", "opinion_id", "opinion__participant_id", "participant_id", "agreement").order_by("id")
    ]
    preferences = [
        Preference(room_id=room_id, arm_a_id=a, arm_b_id=b, preferred_arm_id=preferred)
        for room_id, a, b, preferred in PairwisePreference.objects.filter(round__room__experiment=experiment).values_list(
            "round__room_id", "candidate_a__source_arm_id", "candidate_b__source_arm_id", "preferred__source_arm_id"
        ).order_by("id")
        if a is not None and b is not None and a != b
    ]
    excluded = dict(
        Round.objects.filter(room__experiment=experiment, excluded_participant__isnull=False).values_list("room_id", "excluded_participant_id")
    )
    return StudyData(ratings=ratings, opinion_ratings=opinion_ratings, preferences=preferences, excluded=excluded)


def arm_report(arm: Arm, data: StudyData, *, seed: int, arm_names: dict[int, str]) -> ArmReport:
    def seeded(metric: int) -> list[int]:
        return [seed, arm.pk, metric]

    own = [row for row in data.ratings if row.source_arm_id == arm.pk]
    groups = _by_room(own)

    # Best human opinion: groups assigned to this arm, its own top statement.
    opinion_rows: dict[int, list[OpinionEndorsement]] = defaultdict(list)
    for endorsement in data.opinion_ratings:
        opinion_rows[endorsement.room_id].append(endorsement)
    contests = [
        outcome
        for group in groups
        if group[0].room_arm_id == arm.pk
        and (outcome := best_opinion_outcome(group, opinion_rows.get(group[0].room_id, []))) is not None
    ]

    # Head-to-head: preferences between this arm's statement and another arm's.
    duels: dict[int, list[float]] = defaultdict(list)
    opponents: set[int] = set()
    for pref in data.preferences:
        if arm.pk in (pref.arm_a_id, pref.arm_b_id):
            duels[pref.room_id].append(1.0 if pref.preferred_arm_id == arm.pk else 0.0)
            opponents.add(pref.arm_b_id if pref.arm_a_id == arm.pk else pref.arm_a_id)
    duel_groups = [duels[room_id] for room_id in sorted(duels)]

    # Exclusion: groups of this arm with a recorded excluded member; all statements they rated.
    room_rows: dict[int, list[StatementRating]] = defaultdict(list)
    for row in data.ratings:
        room_rows[row.room_id].append(row)
    exclusion_groups = [
        (room_rows[room_id], excluded_id)
        for room_id, excluded_id in sorted(data.excluded.items())
        if room_rows.get(room_id) and room_rows[room_id][0].room_arm_id == arm.pk
    ]
    differences = [d for rows, excluded_id in exclusion_groups if (d := exclusion_difference(rows, excluded_id)) is not None]
    excluded_means = [
        _mean([r.agreement for r in rows if r.participant_id == excluded_id]) for rows, excluded_id in exclusion_groups
    ]
    included_means = [
        _mean([r.agreement for r in rows if r.participant_id != excluded_id]) for rows, excluded_id in exclusion_groups
    ]

    predicted = [row for row in own if row.predicted is not None]
    participants: list[Hashable] = [row.participant_id for row in predicted]
    targets = [float(row.agreement) for row in predicted]
    scores = [float(row.predicted) for row in predicted if row.predicted is not None]
    accuracy, n_pairs = pairwise_accuracy(participants, scores, targets) if predicted else (None, 0)
    protocols = (["head-to-head vs " + arm_names.get(arm.compare_with_id, "?")] if arm.compare_with_id else []) + (
        ["exclusion"] if arm.exclude_one_opinion else []
    )
    return ArmReport(
        arm_id=arm.pk,
        name=arm.name,
        welfare_method=arm.welfare_method,
        protocols=protocols,
        groups=len(groups),
        ratings=len(own),
        mean_agreement=_estimate(groups, mean_agreement, seeded(1)),
        worst_off_agreement=_estimate(groups, worst_off_agreement, seeded(2)),
        divisiveness=_estimate(groups, divisiveness, seeded(3)),
        mean_quality=_estimate(groups, mean_quality, seeded(4)),
        win_rate_vs_best_opinion=_estimate(contests, _mean, seeded(5)),
        head_to_head_win_rate=_estimate(duel_groups, lambda gs: _mean([x for g in gs for x in g]), seeded(6)),
        head_to_head_opponents=sorted(arm_names.get(o, str(o)) for o in opponents),
        exclusion_effect=_estimate(differences, _mean, seeded(7)),
        excluded_mean_agreement=_mean([m for m in excluded_means if m is not None]),
        included_mean_agreement=_mean([m for m in included_means if m is not None]),
        reward_model=RewardAccuracy(
            mae=mae(scores, targets) if predicted else None,
            spearman=mean_within_participant_spearman(participants, scores, targets) if predicted else None,
            pairwise_accuracy=accuracy,
            rows=len(predicted),
            pairs=n_pairs,
        ),
    )


def experiment_report(experiment: Experiment) -> ExperimentReport:
    data = load_study(experiment)
    arms = list(experiment.arms.order_by("id"))
    names = {arm.pk: arm.name for arm in arms}
    return ExperimentReport(
        experiment=experiment, arms=[arm_report(arm, data, seed=experiment.assignment_seed, arm_names=names) for arm in arms]
    )


# --- CSV ------------------------------------------------------------------------------------------------


def report_csv(report: ExperimentReport) -> str:
    """The figures as CSV; arm names are made spreadsheet-safe (research.exports.spreadsheet_safe)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["arm_id", "arm", "metric", "value", "ci_low", "ci_high", "n_groups"])
    for report_arm in report.arms:
        arm = dataclasses.replace(report_arm, name=spreadsheet_safe(report_arm.name))
        for key, _ in ExperimentReport.METRICS:
            estimate: Estimate = getattr(arm, key)
            writer.writerow([arm.arm_id, arm.name, key, _cell(estimate.value), _cell(estimate.low), _cell(estimate.high), estimate.n])
        writer.writerow([arm.arm_id, arm.name, "excluded_mean_agreement", _cell(arm.excluded_mean_agreement), "", "", ""])
        writer.writerow([arm.arm_id, arm.name, "included_mean_agreement", _cell(arm.included_mean_agreement), "", "", ""])
        for key in ("mae", "spearman", "pairwise_accuracy"):
            writer.writerow([arm.arm_id, arm.name, f"reward_model_{key}", _cell(getattr(arm.reward_model, key)), "", "", ""])
        writer.writerow([arm.arm_id, arm.name, "ratings", arm.ratings, "", "", arm.groups])
    return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# --- Charts (inline SVG, server-rendered: no script, no CDN) ------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    estimate: Estimate


def bar_chart(*, title: str, bars: Sequence[Bar], low: float, high: float, reference: float | None = None, unit: str = "") -> SafeString:
    """Horizontal bars with their bootstrap intervals; `reference` draws a dashed line (e.g. 0.5 for win rates)."""
    label_w, plot_w, row_h, pad = 170, 360, 26, 22
    height = pad * 2 + row_h * max(len(bars), 1)

    def x(value: float) -> float:
        return label_w + (min(max(value, low), high) - low) / (high - low) * plot_w

    parts = [
        format_html('<text x="0" y="14" class="chart-title">{}</text>', title),
        format_html('<line x1="{}" y1="{}" x2="{}" y2="{}" class="axis"/>', label_w, pad, label_w, height - pad),
        format_html('<text x="{}" y="{}" class="tick">{}</text>', label_w, height - 4, f"{low:g}{unit}"),
        format_html('<text x="{}" y="{}" class="tick" text-anchor="end">{}</text>', label_w + plot_w, height - 4, f"{high:g}{unit}"),
    ]
    if reference is not None:
        parts.append(format_html('<line x1="{}" y1="{}" x2="{}" y2="{}" class="reference"/>', f"{x(reference):.1f}", pad, f"{x(reference):.1f}", height - pad))
    for i, bar in enumerate(bars):
        y = pad + i * row_h
        parts.append(format_html('<text x="0" y="{}" class="label">{}</text>', y + 16, bar.label))
        if bar.estimate.value is None:
            parts.append(format_html('<text x="{}" y="{}" class="tick">no data yet</text>', label_w + 6, y + 16))
            continue
        baseline = 0.0 if low <= 0 <= high else low  # bars grow from zero where the scale has one
        start, end = sorted((x(baseline), x(bar.estimate.value)))
        parts.append(
            format_html('<rect x="{}" y="{}" width="{}" height="{}" class="bar"><title>{}</title></rect>',
                        f"{start:.1f}", y + 4, f"{max(end - start, 1):.1f}", row_h - 10, f"{bar.label}: {bar.estimate.value:.3g}")
        )
        if bar.estimate.low is not None and bar.estimate.high is not None:
            parts.append(format_html('<line x1="{}" y1="{}" x2="{}" y2="{}" class="ci"/>',
                                     f"{x(bar.estimate.low):.1f}", y + row_h / 2, f"{x(bar.estimate.high):.1f}", y + row_h / 2))
        parts.append(format_html('<text x="{}" y="{}" class="value">{}</text>', f"{x(bar.estimate.value) + 4:.1f}", y + 16, f"{bar.estimate.value:.2f}"))
    body = format_html_join("", "{}", ((p,) for p in parts))
    return format_html(
        '<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}" xmlns="http://www.w3.org/2000/svg">{}</svg>',
        title, label_w + plot_w + 50, height, label_w + plot_w + 50, height, body,
    )


def charts(report: ExperimentReport) -> list[SafeString]:
    arms = report.arms
    out = [
        bar_chart(title="Mean agreement per arm (95% CI)", bars=[Bar(a.name, a.mean_agreement) for a in arms], low=1, high=7),
        bar_chart(title="Worst-off member's agreement per arm", bars=[Bar(a.name, a.worst_off_agreement) for a in arms], low=1, high=7),
    ]
    wins = [Bar(f"{a.name} vs best opinion", a.win_rate_vs_best_opinion) for a in arms if a.win_rate_vs_best_opinion.available]
    wins += [Bar(f"{a.name} head-to-head", a.head_to_head_win_rate) for a in arms if a.head_to_head_win_rate.available]
    if wins:
        out.append(bar_chart(title="Win rates (dashed: 50%)", bars=wins, low=0, high=1, reference=0.5))
    effects = [Bar(a.name, a.exclusion_effect) for a in arms if a.exclusion_effect.available]
    if effects:
        out.append(bar_chart(title="Exclusion effect (excluded − included, Likert points)", bars=effects, low=-3, high=3, reference=0))
    return [mark_safe(chart) for chart in out]


def table_rows(report: ExperimentReport) -> list[dict[str, object]]:
    """The estimates laid out as table rows (one per figure, one cell per arm)."""
    return [
        {"key": key, "label": label, "cells": [{"arm": arm.name, "estimate": getattr(arm, key)} for arm in report.arms]}
        for key, label in ExperimentReport.METRICS
    ]

"""Analytics of an experiment for inference: per arm, and between every pair of arms.

docs/analytics.md defines every figure. In short, per arm (the arm whose configuration wrote a
statement; in head-to-head rounds two arms write statements in the same group), for the arm's
**chosen** statement (the one its welfare function ranked first: `candidates.rank = 1`, always shown)
and for **all** its shown statements:

- mean agreement: the mean of the agreement ratings (1-7);
- worst-off agreement (Rawlsian): per statement, the lowest agreement any rater gave it; averaged over statements;
- mean quality; divisiveness (mean absolute difference between two raters, per statement);
- win rate against the best human opinion, head-to-head win rate, the exclusion-ablation effect;
- reward-model accuracy, only for arms whose statements were ranked by a reward model that carries
  information (not the `none` baseline's constant).

Between arms: the difference of every figure with a 95% stratified cluster-bootstrap interval (clusters
are groups, resampled within the arm each group was assigned to), a randomisation (permutation) test
that re-assigns groups' arms (swapping the two arms inside a head-to-head group), and Holm's correction
over every comparison on the page (statsmodels). Bootstrap and permutations are seeded from the
experiment's recorded seed, so the page shows the same numbers every time for the same data.

Exclusion rules (research.selectors.EXCLUSION_RULES) are applied by switch; the page shows the
comparisons with and without them.

Scale: ratings are aggregated in the database (per statement: a histogram of agreement values), and
every figure is a ratio of per-group sums, so the bootstrap and the permutations are matrix products
over groups, not loops over ratings. bench/analytics.py times a study of 100,000 ratings.
"""

from __future__ import annotations

import csv
import gc
import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TypeVar

import numpy as np
import pandas as pd
from django.db import connections
from django.db.models import Count, QuerySet, Sum
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from deliberation.models import (
    Arm,
    Candidate,
    Experiment,
    OpinionRating,
    PairwisePreference,
    PredictedAgreement,
    Rating,
    Round,
)
from modeling.reward.registry import reward_model_is_informative

from . import selectors
from .exports import spreadsheet_safe

BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 2000
CONFIDENCE = 0.95
_CHUNK = 250  # resamples per matrix product: bounds memory at 250 x groups

G = TypeVar("G")


# --- The figures --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    low: float  # the scale, for plots
    high: float
    compared: bool = True  # part of the between-arm comparisons (and so of Holm's family)


METRICS: list[Metric] = [
    Metric("chosen_mean_agreement", "Chosen statement: mean agreement (1–7)", 1, 7),
    Metric("chosen_worst_off_agreement", "Chosen statement: worst-off member's agreement (1–7)", 1, 7),
    Metric("chosen_mean_quality", "Chosen statement: mean quality (1–7)", 1, 7),
    Metric("mean_agreement", "All shown: mean agreement (1–7)", 1, 7),
    Metric("worst_off_agreement", "All shown: worst-off member's agreement (1–7)", 1, 7),
    Metric("mean_quality", "All shown: mean quality (1–7)", 1, 7),
    Metric("divisiveness", "All shown: divisiveness (mean |difference| between raters)", 0, 6),
    Metric("win_rate_vs_best_opinion", "Win rate vs best human opinion", 0, 1),
    Metric("head_to_head_win_rate", "Head-to-head win rate", 0, 1, compared=False),
    Metric("exclusion_effect", "Exclusion effect (excluded − included)", -3, 3, compared=False),
]
METRIC_BY_KEY = {metric.key: metric for metric in METRICS}


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
    """Percentile interval of `statistic` over groups resampled with replacement (seeded, so reproducible).

    The plain form, for a statistic of arbitrary group records; the report uses the vectorised
    `ratio_bootstrap`, which computes the same kind of interval for ratios of per-group sums."""
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


def resample_weights(strata: Sequence[int] | np.ndarray, *, rng: np.random.Generator, resamples: int) -> Iterable[np.ndarray]:
    """Stratified cluster-bootstrap weights, a block of (up to) 250 resamples at a time.

    `strata` gives each cluster's stratum, clusters of one stratum contiguous. For each block, for each
    stratum in order, one `rng.integers(0, n, size=(block, n))` call draws the stratum's n clusters n
    times with replacement for every resample of the block; a cluster's weight is how often it was
    drawn. This order of draws is the whole algorithm: an independent implementation with the same
    seed gets the same intervals (tests/simulation/test_pilot.py has one)."""
    labels = np.asarray(strata)
    bounds = _runs(labels)
    for first in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - first)
        block = np.zeros((rows, len(labels)))
        for start, stop in bounds:
            size = stop - start
            draws = rng.integers(0, size, size=(rows, size))
            # Count each row's draws at once: offset row r's indices by r * size.
            counts = np.bincount((draws + np.arange(rows)[:, None] * size).ravel(), minlength=rows * size)
            block[:, start:stop] = counts.reshape(rows, size)
        yield block


def _runs(labels: np.ndarray) -> list[tuple[int, int]]:
    if not len(labels):
        return []
    edges = [0, *[i for i in range(1, len(labels)) if labels[i] != labels[i - 1]], len(labels)]
    return list(zip(edges[:-1], edges[1:]))


def _percentiles(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


# --- Per-group pieces computed on plain rows (the contest and exclusion figures) -------------------------------


@dataclass(frozen=True)
class StatementRating:
    room_id: int
    candidate_id: int
    participant_id: int
    agreement: int
    welfare_rank: int | None


@dataclass(frozen=True)
class OpinionEndorsement:
    room_id: int
    opinion_id: int
    author_id: int
    rater_id: int
    agreement: int


def statement_divisiveness(ratings: Sequence[int]) -> float | None:
    """Mean absolute difference of agreement over all pairs of raters (None with fewer than two)."""
    pairs = list(combinations(ratings, 2))
    return _mean([abs(a - b) for a, b in pairs]) if pairs else None


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
    for row in opinion_rows:
        endorsements[row.opinion_id][row.rater_id] = row.agreement
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


# --- Reading the study (aggregated in the database, streamed) -------------------------------------------------


def _kept(queryset: QuerySet, excluded: QuerySet | None, field_name: str = "participant") -> QuerySet:
    return queryset if excluded is None else queryset.exclude(**{f"{field_name}__in": excluded.values("pk")})


def _frame(queryset: QuerySet, columns: list[str]) -> pd.DataFrame:
    """A values_list query's rows as a DataFrame, fetched in blocks straight from the database cursor (no
    per-row model conversion: the columns are plain numbers)."""
    sql, params = queryset.query.sql_with_params()
    blocks = []
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(20000):
            blocks.append(pd.DataFrame.from_records(rows, columns=columns))
    return pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(columns=columns)


def statement_table(experiment: Experiment, excluded: QuerySet | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per rated shown statement: its group, arm, rank and its raters' sums (from a histogram query).

    The database returns, per statement and agreement value, how many raters gave it and their quality
    sum; divisiveness follows from the histogram: sum over value pairs v < w of count_v * count_w * (w - v).
    """
    histogram = _frame(
        _kept(Rating.objects.filter(candidate__round__room__experiment=experiment), excluded)
        .values("candidate_id", "agreement").annotate(raters=Count("id"), quality=Sum("quality")).order_by()
        .values_list("candidate_id", "agreement", "raters", "quality"),
        ["candidate_id", "agreement", "raters", "quality"],
    )
    candidates = _frame(
        Candidate.objects.filter(round__room__experiment=experiment, shown=True)
        .values_list("id", "round__room_id", "source_arm_id", "round__room__arm_id", "rank"),
        ["candidate_id", "room_id", "arm_id", "stratum", "rank"],
    )
    columns = ["candidate_id", "room_id", "arm_id", "stratum", "chosen", "n", "sum_agreement", "sum_quality", "min_agreement", "divisiveness"]
    if histogram.empty or candidates.empty:
        return pd.DataFrame(columns=columns), pd.DataFrame(columns=["arm_id", "chosen", "agreement", "raters"])
    histogram = histogram.sort_values(["candidate_id", "agreement"])
    grouped = histogram.groupby("candidate_id", sort=True)
    count_below = grouped["raters"].cumsum() - histogram["raters"]
    weighted = histogram["raters"] * histogram["agreement"]
    sum_below = weighted.groupby(histogram["candidate_id"]).cumsum() - weighted
    histogram = histogram.assign(pair_gap=histogram["raters"] * (histogram["agreement"] * count_below - sum_below), weighted=weighted)
    per = histogram.groupby("candidate_id").agg(
        n=("raters", "sum"), sum_agreement=("weighted", "sum"), sum_quality=("quality", "sum"),
        min_agreement=("agreement", "min"), pair_gap=("pair_gap", "sum"),
    )
    pairs = per["n"] * (per["n"] - 1) / 2
    per["divisiveness"] = np.where(pairs > 0, per["pair_gap"] / pairs.where(pairs > 0, 1), np.nan)
    table = candidates.merge(per.reset_index(), on="candidate_id", how="inner")
    table["arm_id"] = table["arm_id"].fillna(table["stratum"]).astype(int)
    table["chosen"] = table["rank"] == 1
    # The histogram with each statement's arm, for the distribution plot.
    counts = histogram[["candidate_id", "agreement", "raters"]].merge(table[["candidate_id", "arm_id", "chosen"]], on="candidate_id")
    return table[columns].astype({"n": float, "sum_agreement": float, "sum_quality": float, "min_agreement": float}), counts


@dataclass
class Units:
    """Every figure as (group, arm) units with a numerator and a denominator: the arm's figure is
    sum(numerators) / sum(denominators) over its units."""

    frame: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["room_id", "stratum", "arm_id", "metric", "num", "den"]))

    def add(self, metric: str, rows: pd.DataFrame, num: str, den: str) -> None:
        if rows.empty:
            return
        part = rows[["room_id", "stratum", "arm_id"]].copy()
        part["metric"], part["num"], part["den"] = metric, rows[num].astype(float).to_numpy(), rows[den].astype(float).to_numpy()
        self.frame = part if self.frame.empty else pd.concat([self.frame, part], ignore_index=True)


def _statement_units(units: Units, table: pd.DataFrame) -> None:
    if table.empty:
        return
    keys = ["room_id", "stratum", "arm_id"]
    for prefix, rows in (("", table), ("chosen_", table[table["chosen"]])):
        if rows.empty:
            continue
        rows = rows.assign(statements=1.0)
        sums = rows.groupby(keys, as_index=False)[["sum_agreement", "sum_quality", "min_agreement", "n", "statements"]].sum()
        units.add(f"{prefix}mean_agreement", sums, "sum_agreement", "n")
        units.add(f"{prefix}mean_quality", sums, "sum_quality", "n")
        units.add(f"{prefix}worst_off_agreement", sums, "min_agreement", "statements")
    spread = table[table["divisiveness"].notna()].assign(statements=1.0)
    if not spread.empty:
        units.add("divisiveness", spread.groupby(keys, as_index=False)[["divisiveness", "statements"]].sum(), "divisiveness", "statements")


def _contest_units(units: Units, experiment: Experiment, excluded: QuerySet | None) -> None:
    """Win rate vs the best human opinion: one unit per group, for the group's own arm (`best_opinion_outcome`
    is the definition, per group; this computes it for every group at once)."""
    endorsements = _frame(
        _kept(OpinionRating.objects.filter(opinion__round__room__experiment=experiment), excluded).values_list(
            "opinion__round__room_id", "opinion_id", "participant_id", "agreement"
        ),
        ["room_id", "opinion_id", "rater_id", "opinion_agreement"],
    )
    if endorsements.empty:
        return
    top = _frame(
        _kept(Rating.objects.filter(candidate__round__room__experiment=experiment, candidate__rank=1, candidate__shown=True), excluded)
        .values_list("candidate__round__room_id", "candidate__round__room__arm_id", "candidate__source_arm_id", "participant_id", "agreement"),
        ["room_id", "stratum", "source_arm_id", "rater_id", "statement_agreement"],
    )
    # The group's own arm's chosen statement (compared here: in the database SQLite picks a slow plan).
    top = top[top["source_arm_id"].isna() | (top["source_arm_id"] == top["stratum"])]
    if top.empty:
        return
    # The best opinion: the highest mean agreement from the other members; ties go to the earliest opinion.
    means = endorsements.groupby(["room_id", "opinion_id"], as_index=False)["opinion_agreement"].mean()
    best = means.sort_values(["room_id", "opinion_agreement", "opinion_id"], ascending=[True, False, True]).drop_duplicates("room_id")
    judged = endorsements.merge(best[["room_id", "opinion_id"]], on=["room_id", "opinion_id"]).merge(
        top[["room_id", "stratum", "rater_id", "statement_agreement"]], on=["room_id", "rater_id"]
    )
    if judged.empty:
        return
    # Both sides judged by the same raters: the members who rated both the best opinion and the statement.
    per = judged.groupby(["room_id", "stratum"], as_index=False)[["statement_agreement", "opinion_agreement"]].mean()
    per["outcome"] = np.where(per["statement_agreement"] > per["opinion_agreement"], 1.0, np.where(per["statement_agreement"] == per["opinion_agreement"], 0.5, 0.0))
    units.add("win_rate_vs_best_opinion", per.assign(arm_id=per["stratum"], one=1.0), "outcome", "one")


def _duel_units(units: Units, experiment: Experiment, excluded: QuerySet | None) -> None:
    """Head-to-head: per group and arm, the preferences won out of those between this arm and another."""
    duels = _kept(PairwisePreference.objects.filter(round__room__experiment=experiment), excluded)
    per: dict[tuple[int, int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for room_id, stratum, a, b, preferred, count in (
        duels.values("round__room_id", "round__room__arm_id", "candidate_a__source_arm_id", "candidate_b__source_arm_id", "preferred__source_arm_id")
        .annotate(count=Count("id")).order_by()
        .values_list("round__room_id", "round__room__arm_id", "candidate_a__source_arm_id", "candidate_b__source_arm_id", "preferred__source_arm_id", "count")
    ):
        if a is None or b is None or a == b:
            continue
        for arm_id in (a, b):
            won_total = per[(room_id, stratum, arm_id)]
            won_total[0] += count if preferred == arm_id else 0
            won_total[1] += count
    frame = pd.DataFrame([(r, s, a, won, total) for (r, s, a), (won, total) in sorted(per.items())], columns=["room_id", "stratum", "arm_id", "won", "total"])
    units.add("head_to_head_win_rate", frame, "won", "total")


@dataclass
class ExclusionAblation:
    excluded_mean: dict[int, float] = field(default_factory=dict)  # arm id -> pooled mean of excluded members
    included_mean: dict[int, float] = field(default_factory=dict)


def _ablation_units(units: Units, experiment: Experiment, excluded: QuerySet | None) -> ExclusionAblation:
    """Exclusion ablation: per group with a left-out member, that member's mean agreement minus the included members'."""
    left_out = dict(
        Round.objects.filter(room__experiment=experiment, excluded_participant__isnull=False).values_list("room_id", "excluded_participant_id")
    )
    ablation = ExclusionAblation()
    if not left_out:
        return ablation
    sums = _kept(Rating.objects.filter(candidate__round__room_id__in=list(left_out)), excluded).values(
        "candidate__round__room_id", "candidate__round__room__arm_id", "participant_id"
    ).annotate(total=Sum("agreement"), count=Count("id")).order_by()
    members: dict[tuple[int, int], dict[int, tuple[float, int]]] = defaultdict(dict)
    for row in sums:
        members[(row["candidate__round__room_id"], row["candidate__round__room__arm_id"])][row["participant_id"]] = (row["total"], row["count"])
    rows: list[tuple[int, int, int, float]] = []
    pooled: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for (room_id, arm_id), per_member in sorted(members.items()):
        excluded_id = left_out[room_id]
        if excluded_id not in per_member or len(per_member) < 2:
            continue
        total, count = per_member[excluded_id]
        included = [t / c for member, (t, c) in per_member.items() if member != excluded_id]
        rows.append((room_id, arm_id, arm_id, total / count - math.fsum(included) / len(included)))
        p = pooled[arm_id]
        p[0] += total
        p[1] += count
        p[2] += sum(t for member, (t, _) in per_member.items() if member != excluded_id)
        p[3] += sum(c for member, (_, c) in per_member.items() if member != excluded_id)
    units.add("exclusion_effect", pd.DataFrame(rows, columns=["room_id", "stratum", "arm_id", "difference"]).assign(one=1.0), "difference", "one")
    for arm_id, (excluded_total, excluded_count, included_total, included_count) in pooled.items():
        ablation.excluded_mean[arm_id] = excluded_total / excluded_count
        ablation.included_mean[arm_id] = included_total / included_count
    return ablation


# --- Reward-model accuracy ----------------------------------------------------------------------------------


@dataclass
class RewardAccuracy:
    mae: float | None
    spearman: float | None
    pairwise_accuracy: float | None
    rows: int
    pairs: int


def within_participant_spearman(participants: Sequence[int], predictions: Sequence[float], targets: Sequence[float]) -> float | None:
    """modeling.reward.metrics.mean_within_participant_spearman, vectorised for a whole study (the same
    definition: Spearman's rho is Pearson's r of average ranks; participants with fewer than two distinct
    ratings are skipped; a participant whose predictions are all equal counts 0)."""
    frame = pd.DataFrame({"p": participants, "x": predictions, "y": targets})
    if frame.empty:
        return None
    grouped = frame.groupby("p")
    distinct_y, distinct_x = grouped["y"].transform("nunique"), grouped["x"].transform("nunique")
    frame = frame[distinct_y >= 2].assign(flat=distinct_x[distinct_y >= 2] < 2)
    if frame.empty:
        return None
    frame = frame.assign(rx=frame.groupby("p")["x"].rank(method="average"), ry=frame.groupby("p")["y"].rank(method="average"))
    frame = frame.assign(rxy=frame["rx"] * frame["ry"], rxx=frame["rx"] ** 2, ryy=frame["ry"] ** 2)
    sums = frame.groupby("p").agg(n=("rx", "size"), sx=("rx", "sum"), sy=("ry", "sum"), sxy=("rxy", "sum"), sxx=("rxx", "sum"), syy=("ryy", "sum"), flat=("flat", "first"))
    covariance = sums["sxy"] - sums["sx"] * sums["sy"] / sums["n"]
    spread = np.sqrt((sums["sxx"] - sums["sx"] ** 2 / sums["n"]) * (sums["syy"] - sums["sy"] ** 2 / sums["n"]))
    rho = np.where(sums["flat"], 0.0, covariance / spread.where(spread > 0, 1))
    return float(math.fsum(rho) / len(rho))


def pairwise_agreement_accuracy(frame: pd.DataFrame) -> tuple[float | None, int]:
    """modeling.reward.metrics.pairwise_accuracy for a whole study (columns p, x = predicted, y = rated): over
    pairs of one participant's ratings that differ, the share the predictions order the same way (a
    predicted tie counts half)."""
    pairs = frame.merge(frame, on="p", suffixes=("_i", "_j"))
    pairs = pairs[(pairs["row_i"] < pairs["row_j"]) & (pairs["y_i"] != pairs["y_j"])]
    if pairs.empty:
        return None, 0
    same_order = (pairs["x_i"] > pairs["x_j"]) == (pairs["y_i"] > pairs["y_j"])
    score = np.where(pairs["x_i"] == pairs["x_j"], 0.5, np.where(same_order, 1.0, 0.0))
    return float(math.fsum(score) / len(score)), len(score)


def reward_accuracy(experiment: Experiment, excluded: QuerySet | None) -> dict[int, RewardAccuracy]:
    """Predicted against rated agreement, per arm, over (member, shown statement) pairs that have both, and
    only where the prediction came from an informative reward model (the `none` baseline predicts a
    constant: its 'accuracy' would measure nothing)."""
    rated = _frame(
        _kept(Rating.objects.filter(candidate__round__room__experiment=experiment), excluded).values_list(
            "candidate_id", "participant_id", "candidate__source_arm_id", "candidate__round__room__arm_id", "agreement"
        ),
        ["candidate_id", "p", "source_arm_id", "room_arm_id", "y"],
    )
    predicted = _frame(
        PredictedAgreement.objects.filter(candidate__round__room__experiment=experiment).values_list("candidate_id", "participant_id", "score", "reward_model"),
        ["candidate_id", "p", "x", "model"],
    )
    if rated.empty or predicted.empty:
        return {}
    predicted = predicted[predicted["model"].map({m: reward_model_is_informative(m) for m in predicted["model"].unique()}).astype(bool)]
    rows = rated.merge(predicted, on=["candidate_id", "p"])
    rows["arm_id"] = rows["source_arm_id"].fillna(rows["room_arm_id"]).astype(int)
    out = {}
    for arm_id, arm_rows in rows.groupby("arm_id"):
        arm_rows = arm_rows.reset_index(drop=True).assign(row=lambda f: np.arange(len(f)), x=lambda f: f["x"].astype(float), y=lambda f: f["y"].astype(float))
        accuracy, pairs = pairwise_agreement_accuracy(arm_rows[["p", "x", "y", "row"]])
        out[int(arm_id)] = RewardAccuracy(
            mae=float(np.abs(arm_rows["x"] - arm_rows["y"]).mean()),
            spearman=within_participant_spearman(arm_rows["p"].tolist(), arm_rows["x"].tolist(), arm_rows["y"].tolist()),
            pairwise_accuracy=accuracy, rows=len(arm_rows), pairs=pairs,
        )
    return out


# --- The report ---------------------------------------------------------------------------------------------


@dataclass
class ArmReport:
    arm_id: int
    name: str
    welfare_method: str
    protocols: list[str]
    groups: int
    ratings: int
    estimates: dict[str, Estimate]
    excluded_mean_agreement: float | None
    included_mean_agreement: float | None
    reward_model: RewardAccuracy | None  # None: the arm's statements were not ranked by an informative reward model


@dataclass
class Comparison:
    """Arm a minus arm b on one figure."""

    metric: str
    arm_a: str
    arm_b: str
    arm_a_id: int
    arm_b_id: int
    a: float | None
    b: float | None
    difference: Estimate
    p_value: float | None
    p_holm: float | None = None

    @property
    def label(self) -> str:
        return METRIC_BY_KEY[self.metric].label


@dataclass
class Distribution:
    """Agreement ratings of one arm's statements, counted per value 1..7: chosen statements and all shown."""

    arm: str
    chosen: list[int]
    all_shown: list[int]


@dataclass
class Analysis:
    rules: tuple[str, ...]
    arms: list[ArmReport]
    comparisons: list[Comparison]
    exclusions: list[selectors.ExclusionCount]
    distributions: list[Distribution]

    @property
    def rules_text(self) -> str:
        return "+".join(self.rules) if self.rules else "none"


@dataclass
class ExperimentReport:
    experiment: Experiment
    analysis: Analysis  # with the rules asked for
    without_exclusions: Analysis | None = None  # the same without any rule, when rules were asked for

    @property
    def arms(self) -> list[ArmReport]:
        return self.analysis.arms

    def analyses(self) -> list[Analysis]:
        return [self.analysis] + ([self.without_exclusions] if self.without_exclusions is not None else [])


def _cluster_matrix(frame: pd.DataFrame, columns: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Clusters (groups) ordered by stratum then id, and their per-column numerators and denominators."""
    clusters = frame[["stratum", "room_id"]].drop_duplicates().sort_values(["stratum", "room_id"])
    index = {room_id: i for i, room_id in enumerate(clusters["room_id"])}
    column_index = {key: j for j, key in enumerate(columns)}
    num = np.zeros((len(index), len(columns)))
    den = np.zeros((len(index), len(columns)))
    rows = frame["room_id"].map(index).to_numpy()
    cols = np.array([column_index.get((m, int(a)), -1) for m, a in zip(frame["metric"], frame["arm_id"])], dtype=int)
    keep = cols >= 0
    np.add.at(num, (rows[keep], cols[keep]), frame["num"].to_numpy(dtype=float)[keep])
    np.add.at(den, (rows[keep], cols[keep]), frame["den"].to_numpy(dtype=float)[keep])
    return num, den, clusters["stratum"].to_numpy(), list(clusters["room_id"])


def bootstrap_arm_figures(units: pd.DataFrame, *, seed: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
    """Every (figure, arm) column's point value and its bootstrap replicates (resamples x columns)."""
    columns = sorted({(m, int(a)) for m, a in zip(units["metric"], units["arm_id"])})
    num, den, strata, _ = _cluster_matrix(units, columns)
    point = _ratio(num.sum(axis=0), den.sum(axis=0))
    rng = np.random.default_rng(list(seed))
    replicates = np.vstack([_ratio(block @ num, block @ den) for block in resample_weights(strata, rng=rng, resamples=resamples)]) if len(strata) else np.zeros((0, len(columns)))
    return columns, point, replicates


def permutation_pvalues(
    units: pd.DataFrame, metrics: Sequence[str], arm_a: int, arm_b: int, *, seed: Sequence[int], permutations: int = PERMUTATIONS
) -> dict[str, float]:
    """Two-sided randomisation tests of (a - b), one per figure, under the sharp null that the arm makes no
    difference. Groups that contain only one of the two arms have their arm labels permuted among them (as
    the assignment could have fallen); in groups that contain both (head-to-head) the two arms' labels are
    swapped with probability 1/2. Every figure uses the same permutations.
    p = (1 + #{|permuted difference| >= |observed|}) / (1 + permutations)."""
    rows = units[units["metric"].isin(list(metrics)) & units["arm_id"].isin([arm_a, arm_b])]
    if rows.empty:
        return {}
    rooms = sorted(rows["room_id"].unique())
    room_index = {room_id: i for i, room_id in enumerate(rooms)}
    metric_index = {metric: j for j, metric in enumerate(metrics)}
    shape = (len(rooms), len(metrics))
    a_num, a_den, b_num, b_den = (np.zeros(shape) for _ in range(4))
    i = rows["room_id"].map(room_index).to_numpy()
    j = rows["metric"].map(metric_index).to_numpy()
    is_a = (rows["arm_id"] == arm_a).to_numpy()
    values, weights = rows["num"].to_numpy(dtype=float), rows["den"].to_numpy(dtype=float)
    np.add.at(a_num, (i[is_a], j[is_a]), values[is_a])
    np.add.at(a_den, (i[is_a], j[is_a]), weights[is_a])
    np.add.at(b_num, (i[~is_a], j[~is_a]), values[~is_a])
    np.add.at(b_den, (i[~is_a], j[~is_a]), weights[~is_a])
    observed = _ratio(a_num.sum(0), a_den.sum(0)) - _ratio(b_num.sum(0), b_den.sum(0))
    has_a, has_b = a_den.sum(1) > 0, b_den.sum(1) > 0
    paired = has_a & has_b
    single = ~paired
    # A group with one of the arms: its values go to whichever arm the permuted label names.
    s_num, s_den, s_is_a = (a_num + b_num)[single], (a_den + b_den)[single], has_a[single].astype(float)
    pa_num, pa_den, pb_num, pb_den = a_num[paired], a_den[paired], b_num[paired], b_den[paired]
    totals = [m.sum(0) for m in (s_num, s_den, pa_num, pa_den, pb_num, pb_den)]
    rng = np.random.default_rng(list(seed))
    extreme = np.zeros(len(metrics))
    for first in range(0, permutations, _CHUNK):
        size = min(_CHUNK, permutations - first)
        labels = rng.permuted(np.tile(s_is_a, (size, 1)), axis=1)
        flips = rng.integers(0, 2, size=(size, int(paired.sum()))).astype(float)
        ls_num, ls_den = labels @ s_num, labels @ s_den
        fa_num, fa_den, fb_num, fb_den = flips @ pa_num, flips @ pa_den, flips @ pb_num, flips @ pb_den
        # Flipped groups give arm a what arm b's statements got, and the other way round.
        perm_a_num = ls_num + totals[2] - fa_num + fb_num
        perm_a_den = ls_den + totals[3] - fa_den + fb_den
        perm_b_num = totals[0] - ls_num + fa_num + totals[4] - fb_num
        perm_b_den = totals[1] - ls_den + fa_den + totals[5] - fb_den
        statistic = _ratio(perm_a_num, perm_a_den) - _ratio(perm_b_num, perm_b_den)
        extreme += np.sum(np.abs(np.nan_to_num(statistic, nan=0.0)) >= np.abs(observed) - 1e-12, axis=0)
    return {metric: float((1 + extreme[j]) / (1 + permutations)) for metric, j in metric_index.items() if math.isfinite(observed[j])}


def analyse(experiment: Experiment, rules: tuple[str, ...] = ()) -> Analysis:
    from statsmodels.stats.multitest import multipletests

    excluded = selectors.excluded_participants(experiment, rules) if rules else None
    arms = list(experiment.arms.order_by("id"))
    names = {arm.pk: arm.name for arm in arms}
    table, histogram = statement_table(experiment, excluded)
    units = Units()
    _statement_units(units, table)
    _contest_units(units, experiment, excluded)
    _duel_units(units, experiment, excluded)
    ablation = _ablation_units(units, experiment, excluded)
    frame = units.frame
    seed = experiment.assignment_seed
    columns, point, replicates = (bootstrap_arm_figures(frame, seed=[seed, 1]) if not frame.empty else ([], np.zeros(0), np.zeros((0, 0))))
    col = {key: j for j, key in enumerate(columns)}
    groups_per = frame.groupby(["metric", "arm_id"])["room_id"].nunique().to_dict() if not frame.empty else {}
    accuracy = reward_accuracy(experiment, excluded)

    def estimate(metric: str, arm_id: int) -> Estimate:
        j = col.get((metric, arm_id))
        if j is None or not math.isfinite(point[j]):
            return Estimate(None)
        low, high = _percentiles(replicates[:, j]) if len(replicates) else (None, None)
        return Estimate(float(point[j]), low, high, int(groups_per.get((metric, arm_id), 0)))

    reports = []
    for arm in arms:
        protocols = (["head-to-head vs " + names.get(arm.compare_with_id, "?")] if arm.compare_with_id else []) + (
            ["exclusion"] if arm.exclude_one_opinion else []
        )
        own = table[table["arm_id"] == arm.pk] if not table.empty else table
        reports.append(
            ArmReport(
                arm_id=arm.pk, name=arm.name, welfare_method=arm.welfare_method, protocols=protocols,
                groups=int(own["room_id"].nunique()) if not own.empty else 0, ratings=int(own["n"].sum()) if not own.empty else 0,
                estimates={metric.key: estimate(metric.key, arm.pk) for metric in METRICS},
                excluded_mean_agreement=ablation.excluded_mean.get(arm.pk), included_mean_agreement=ablation.included_mean.get(arm.pk),
                reward_model=accuracy.get(arm.pk),
            )
        )
    comparisons = []
    compared = [m.key for m in METRICS if m.compared]
    for first, second in combinations(arms, 2):
        pvalues = permutation_pvalues(frame, compared, first.pk, second.pk, seed=[seed, 2, first.pk, second.pk]) if not frame.empty else {}
        for metric in (m for m in METRICS if m.compared):
            ja, jb = col.get((metric.key, first.pk)), col.get((metric.key, second.pk))
            if ja is None or jb is None or not (math.isfinite(point[ja]) and math.isfinite(point[jb])):
                continue
            differences = replicates[:, ja] - replicates[:, jb]
            low, high = _percentiles(differences)
            n = int(frame[(frame["metric"] == metric.key) & frame["arm_id"].isin([first.pk, second.pk])]["room_id"].nunique())
            comparisons.append(
                Comparison(
                    metric=metric.key, arm_a=first.name, arm_b=second.name, arm_a_id=first.pk, arm_b_id=second.pk,
                    a=float(point[ja]), b=float(point[jb]), difference=Estimate(float(point[ja] - point[jb]), low, high, n),
                    p_value=pvalues.get(metric.key),
                )
            )
    tested = [c for c in comparisons if c.p_value is not None]
    if tested:
        # statsmodels' Holm path calls gc.collect(); freezing first keeps that from walking the whole heap.
        gc.freeze()
        try:
            _, adjusted, _, _ = multipletests([c.p_value for c in tested], method="holm")
        finally:
            gc.unfreeze()
        for comparison, p in zip(tested, adjusted):
            comparison.p_holm = float(p)
    return Analysis(
        rules=rules, arms=reports, comparisons=comparisons, exclusions=selectors.exclusion_counts(experiment, rules),
        distributions=_distributions(histogram, arms),
    )


def _distributions(histogram: pd.DataFrame, arms: list[Arm]) -> list[Distribution]:
    per: dict[int, Distribution] = {arm.pk: Distribution(arm.name, [0] * 7, [0] * 7) for arm in arms}
    if not histogram.empty:
        grouped = histogram.groupby(["arm_id", "chosen", "agreement"])["raters"].sum()
        for (arm_id, chosen, agreement), count in grouped.items():
            distribution = per.get(int(arm_id))
            if distribution is None:
                continue
            distribution.all_shown[int(agreement) - 1] += int(count)
            if chosen:
                distribution.chosen[int(agreement) - 1] += int(count)
    return [per[arm.pk] for arm in arms if sum(per[arm.pk].all_shown)]


def experiment_report(experiment: Experiment, rules: tuple[str, ...] = ()) -> ExperimentReport:
    return ExperimentReport(
        experiment=experiment, analysis=analyse(experiment, rules), without_exclusions=analyse(experiment) if rules else None
    )


# --- CSV ------------------------------------------------------------------------------------------------


def report_csv(report: ExperimentReport) -> str:
    """The figures and the comparisons as CSV, for every analysis on the page (with and without the exclusion
    rules, named in the `exclusions` column); arm names are made spreadsheet-safe."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["exclusions", "kind", "arm_id", "arm", "other_arm", "metric", "value", "ci_low", "ci_high", "n_groups", "p_value", "p_holm"])
    for analysis in report.analyses():
        rules = analysis.rules_text
        for arm in analysis.arms:
            name = spreadsheet_safe(arm.name)
            for metric in METRICS:
                e = arm.estimates[metric.key]
                writer.writerow([rules, "arm", arm.arm_id, name, "", metric.key, _cell(e.value), _cell(e.low), _cell(e.high), e.n, "", ""])
            writer.writerow([rules, "arm", arm.arm_id, name, "", "excluded_mean_agreement", _cell(arm.excluded_mean_agreement), "", "", "", "", ""])
            writer.writerow([rules, "arm", arm.arm_id, name, "", "included_mean_agreement", _cell(arm.included_mean_agreement), "", "", "", "", ""])
            if arm.reward_model is not None:
                for key in ("mae", "spearman", "pairwise_accuracy"):
                    writer.writerow([rules, "arm", arm.arm_id, name, "", f"reward_model_{key}", _cell(getattr(arm.reward_model, key)), "", "", "", "", ""])
            writer.writerow([rules, "arm", arm.arm_id, name, "", "ratings", arm.ratings, "", "", arm.groups, "", ""])
        for c in analysis.comparisons:
            writer.writerow([
                rules, "difference", c.arm_a_id, spreadsheet_safe(c.arm_a), spreadsheet_safe(c.arm_b), c.metric, _cell(c.difference.value),
                _cell(c.difference.low), _cell(c.difference.high), c.difference.n, _cell(c.p_value), _cell(c.p_holm),
            ])
        for count in analysis.exclusions:
            writer.writerow([rules, "excluded", "", "", "", f"excluded_by:{count.rule}", count.participants, "", "", count.groups, "", ""])
    return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# --- Charts on the page (inline SVG, server-rendered: no script, no CDN) ------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    estimate: Estimate


def bar_chart(*, title: str, bars: Sequence[Bar], low: float, high: float, reference: float | None = None, unit: str = "") -> SafeString:
    """Horizontal bars with their bootstrap intervals; `reference` draws a dashed line (e.g. 0.5 for win rates).

    The value label sits to the right of both the bar and its interval's whisker, never over it."""
    label_w, plot_w, row_h, pad, value_w = 170, 360, 26, 22, 50
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
                        f"{start:.1f}", y + 4, f"{max(end - start, 1):.1f}", row_h - 10, f"{bar.estimate.value:.3g}")
        )
        right = max(end, x(bar.estimate.value))
        if bar.estimate.low is not None and bar.estimate.high is not None:
            parts.append(format_html('<line x1="{}" y1="{}" x2="{}" y2="{}" class="ci"/>',
                                     f"{x(bar.estimate.low):.1f}", y + row_h / 2, f"{x(bar.estimate.high):.1f}", y + row_h / 2))
            right = max(right, x(bar.estimate.high))
        parts.append(format_html('<text x="{}" y="{}" class="value">{}</text>', f"{right + 4:.1f}", y + 16, f"{bar.estimate.value:.2f}"))
    body = format_html_join("", "{}", ((p,) for p in parts))
    width = label_w + plot_w + value_w
    return format_html(
        '<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}" xmlns="http://www.w3.org/2000/svg">{}</svg>',
        title, width, height, width, height, body,
    )


def charts(report: ExperimentReport) -> list[SafeString]:
    arms = report.arms
    out = [
        bar_chart(title="Chosen statement: mean agreement per arm (95% CI)", bars=[Bar(a.name, a.estimates["chosen_mean_agreement"]) for a in arms], low=1, high=7),
        bar_chart(title="All shown: mean agreement per arm (95% CI)", bars=[Bar(a.name, a.estimates["mean_agreement"]) for a in arms], low=1, high=7),
        bar_chart(title="All shown: worst-off member's agreement per arm", bars=[Bar(a.name, a.estimates["worst_off_agreement"]) for a in arms], low=1, high=7),
    ]
    wins = [Bar(f"{a.name} vs best opinion", a.estimates["win_rate_vs_best_opinion"]) for a in arms if a.estimates["win_rate_vs_best_opinion"].available]
    wins += [Bar(f"{a.name} head-to-head", a.estimates["head_to_head_win_rate"]) for a in arms if a.estimates["head_to_head_win_rate"].available]
    if wins:
        out.append(bar_chart(title="Win rates (dashed: 50%)", bars=wins, low=0, high=1, reference=0.5))
    effects = [Bar(a.name, a.estimates["exclusion_effect"]) for a in arms if a.estimates["exclusion_effect"].available]
    if effects:
        out.append(bar_chart(title="Exclusion effect (excluded − included, Likert points)", bars=effects, low=-3, high=3, reference=0))
    return [mark_safe(chart) for chart in out]


def table_rows(report: ExperimentReport) -> list[dict[str, object]]:
    """The estimates laid out as table rows (one per figure, one cell per arm)."""
    return [
        {"key": metric.key, "label": metric.label, "cells": [{"arm": arm.name, "estimate": arm.estimates[metric.key]} for arm in report.arms]}
        for metric in METRICS
    ]

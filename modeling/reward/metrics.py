"""Reward-model evaluation: how well predicted agreement matches ratings.

All metrics take parallel sequences of rows (each with a participant key and a
true `agreement`) and predictions:

- mae: mean absolute error on the 1-7 scale.
- spearman: Spearman rank correlation between predicted and true agreement,
  computed within each participant (ratings are only comparable within a
  person: people use the scale differently) and averaged over participants who
  rated at least two statements differently. A participant whose predictions are
  all equal gets 0: such a model carries no ranking information for them (the
  correlation is otherwise undefined), which is what the constant baseline scores.
- pairwise_accuracy: over pairs of statements the same participant rated
  differently, the share the model orders the same way; a predicted tie counts
  as half right, so a constant predictor scores exactly 0.5. This is the metric
  that matters for ranking candidates, since welfare only needs the order.

- welfare_winner_match: per group (members x candidates every member rated), whether
  the utilitarian welfare winner (modeling.welfare) under the predictions is a
  winner under the true ratings (ties in the truth: any tied winner counts).
- calibration_by_bin: predictions binned by rounding to the nearest scale point;
  per bin the mean prediction, the mean true rating and the count.

Baselines: the constant mean of the training ratings, and the zero-shot
similarity model (similarity.py), plain and question-aware.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from ..welfare import utilitarian_welfare
from .base import AgreementQuery, RewardModel


@dataclass(frozen=True)
class RatedQuery:
    """One observed rating: `participant` (any hashable key, e.g. (group, participant)) rated `query`."""

    participant: Hashable
    query: AgreementQuery
    agreement: float


def mae(predictions: Sequence[float], targets: Sequence[float]) -> float:
    _check_lengths(predictions, targets)
    return math.fsum(abs(p - t) for p, t in zip(predictions, targets)) / len(targets)


def _by_participant(
    participants: Sequence[Hashable], predictions: Sequence[float], targets: Sequence[float]
) -> dict[Hashable, list[tuple[float, float]]]:
    grouped: dict[Hashable, list[tuple[float, float]]] = defaultdict(list)
    for participant, prediction, target in zip(participants, predictions, targets):
        grouped[participant].append((prediction, target))
    return grouped


def mean_within_participant_spearman(
    participants: Sequence[Hashable], predictions: Sequence[float], targets: Sequence[float]
) -> float | None:
    """Mean over participants with >= 2 distinct ratings; None when there is no such participant."""
    _check_lengths(predictions, targets, participants)
    correlations: list[float] = []
    for pairs in _by_participant(participants, predictions, targets).values():
        predicted = [p for p, _ in pairs]
        true = [t for _, t in pairs]
        if len(set(true)) < 2:
            continue  # nothing to rank
        if len(set(predicted)) < 2:
            correlations.append(0.0)
            continue
        correlations.append(float(spearmanr(predicted, true).statistic))
    if not correlations:
        return None
    return math.fsum(correlations) / len(correlations)


def pairwise_accuracy(participants: Sequence[Hashable], predictions: Sequence[float], targets: Sequence[float]) -> tuple[float | None, int]:
    """(accuracy, number of pairs) over same-participant pairs with different ratings."""
    _check_lengths(predictions, targets, participants)
    correct = 0.0
    pairs_seen = 0
    for pairs in _by_participant(participants, predictions, targets).values():
        for i in range(len(pairs)):
            for j in range(i + 1, len(pairs)):
                (pred_i, true_i), (pred_j, true_j) = pairs[i], pairs[j]
                if true_i == true_j:
                    continue
                pairs_seen += 1
                if pred_i == pred_j:
                    correct += 0.5
                elif (pred_i > pred_j) == (true_i > true_j):
                    correct += 1.0
    return (correct / pairs_seen if pairs_seen else None), pairs_seen


def evaluate_predictions(rows: Sequence[RatedQuery], predictions: Sequence[float]) -> dict[str, Any]:
    """All metrics for one set of predictions."""
    _check_lengths(predictions, rows)
    if not rows:
        raise ValueError("cannot evaluate on zero rows")
    participants = [row.participant for row in rows]
    targets = [row.agreement for row in rows]
    accuracy, n_pairs = pairwise_accuracy(participants, predictions, targets)
    groups = [_group_of(row.participant) for row in rows]
    winner_match, n_groups = welfare_winner_match(groups, participants, [row.query.statement for row in rows], predictions, targets)
    return {
        "mae": mae(predictions, targets),
        "spearman": mean_within_participant_spearman(participants, predictions, targets),
        "pairwise_accuracy": accuracy,
        "welfare_winner_match": winner_match,
        "welfare_groups": n_groups,
        "calibration": calibration_by_bin(predictions, targets),
        "rows": len(rows),
        "participants": len(set(participants)),
        "pairs": n_pairs,
    }


def _group_of(participant: Hashable) -> Hashable:
    """Participant keys are (group, participant) tuples for dataset rows; any other key is its own group."""
    if isinstance(participant, tuple) and len(participant) == 2:
        return participant[0]
    return participant


def welfare_winner_match(
    groups: Sequence[Hashable],
    participants: Sequence[Hashable],
    statements: Sequence[str],
    predictions: Sequence[float],
    targets: Sequence[float],
) -> tuple[float | None, int]:
    """(share of groups whose predicted utilitarian winner is a true winner, number of groups).

    Groups with fewer than two candidates rated by every member are skipped; a
    candidate missing a member's rating is left out of that group's matrix.
    """
    _check_lengths(predictions, targets, participants, groups, statements)
    cells: dict[Hashable, dict[tuple[Hashable, str], tuple[float, float]]] = defaultdict(dict)
    for group, participant, statement, prediction, target in zip(groups, participants, statements, predictions, targets):
        cells[group][(participant, statement)] = (prediction, target)
    matches = 0
    counted = 0
    for table in cells.values():
        members = sorted({p for p, _ in table}, key=repr)
        candidates = sorted({s for _, s in table})
        complete = [s for s in candidates if all((p, s) in table for p in members)]
        if len(complete) < 2:
            continue
        predicted = np.array([[table[(p, s)][0] for s in complete] for p in members])
        true = np.array([[table[(p, s)][1] for s in complete] for p in members])
        predicted_welfare = utilitarian_welfare(predicted)
        true_welfare = utilitarian_welfare(true)
        winner = int(np.argmax(predicted_welfare))
        best = max(true_welfare)
        counted += 1
        matches += int(math.isclose(true_welfare[winner], best))
    return (matches / counted if counted else None), counted


def calibration_by_bin(predictions: Sequence[float], targets: Sequence[float]) -> list[dict[str, float]]:
    """Per predicted scale point (prediction rounded to 1..7): mean predicted, mean true, count."""
    _check_lengths(predictions, targets)
    bins: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for prediction, target in zip(predictions, targets):
        bins[int(min(7, max(1, math.floor(prediction + 0.5))))].append((prediction, target))
    return [
        {
            "bin": float(point),
            "mean_predicted": math.fsum(p for p, _ in pairs) / len(pairs),
            "mean_true": math.fsum(t for _, t in pairs) / len(pairs),
            "count": float(len(pairs)),
        }
        for point, pairs in sorted(bins.items())
    ]


def constant_predictions(rows: Sequence[RatedQuery], value: float) -> list[float]:
    return [value] * len(rows)


def evaluate_model(model: RewardModel, rows: Sequence[RatedQuery]) -> tuple[dict[str, Any], list[float]]:
    """Metrics and the predictions themselves (one batched predict call)."""
    predictions = model.predict([row.query for row in rows])
    return evaluate_predictions(rows, predictions), predictions


def compare_with_baselines(
    rows: Sequence[RatedQuery],
    model_predictions: Sequence[float],
    *,
    train_mean: float,
    baselines: Mapping[str, RewardModel] | None = None,
) -> dict[str, dict[str, Any]]:
    """The model, the constant-mean baseline and each baseline model, side by side."""
    report = {
        "model": evaluate_predictions(rows, model_predictions),
        "constant_mean": {**evaluate_predictions(rows, constant_predictions(rows, train_mean)), "value": train_mean},
    }
    for name, baseline in (baselines or {}).items():
        report[name], _ = evaluate_model(baseline, rows)
        report[name]["version"] = baseline.version
    return report


def similarity_baselines(embedding_model: str = "all-minilm-l6-v2", *, device: str = "auto") -> dict[str, RewardModel]:
    """Both variants of the zero-shot similarity model, under the names reports use."""
    from .registry import get_reward_model

    return {
        "similarity": get_reward_model("similarity", embedding_model=embedding_model, device=device),
        "similarity_question_aware": get_reward_model("similarity", embedding_model=embedding_model, device=device, question_aware=True),
    }


def _check_lengths(*sequences: Sequence[Any]) -> None:
    lengths = {len(sequence) for sequence in sequences}
    if len(lengths) > 1:
        raise ValueError(f"metrics need sequences of equal length, got lengths {sorted(lengths)}")

"""Social welfare functions: turn predicted agreement into a ranking of candidates.

`scores[p][c]` is participant p's (predicted) agreement with candidate c, on the
1-7 Likert scale. Each method maps a candidate's column of scores to one number,
its welfare (higher is better), and candidates are ranked by welfare:

- utilitarian: arithmetic mean.
- rawlsian: minimum (the worst-off member's agreement).
- nash: geometric mean (isoelastic with alpha = 1).
- isoelastic: generalised mean of order 1 - alpha, alpha >= 0
  (alpha = 0 is the mean, alpha = 1 the geometric mean, alpha -> inf the minimum).
- borda: each participant's scores induce a ballot (equal scores are tied on the
  ballot); a candidate receives one point per candidate below it and half a point
  per candidate tied with it; welfare is the mean number of points.
- schulze: the Schulze method (beatpath, winning votes) over the same ballots,
  ordered as the Habermas Machine orders it (schulze_method.py `_rank_candidates`):
  by levels of how many candidates beat each one (fewer is better); welfare is the
  number of other candidates that do NOT beat a candidate, so every unbeaten
  candidate shares the top level.
- schulze_wins: the same Schulze relation, ordered by how many other candidates
  each one beats (more is better). This was Concord's order for `schulze` before it
  followed the Habermas Machine; both extend the (transitive) Schulze relation and
  agree on who is unbeaten when there is a unique winner, but may order the rest
  differently (docs/welfare.md has the 5-voter example where they differ).

Exact welfare ties are broken by `tie_break` (see TIE_BREAKS). The options mirror
the Habermas Machine's social-choice code (google-deepmind/habermas_machine,
habermas_machine/social_choice/utils.py `TieBreakingMethod` and
schulze_method.py `Schulze.aggregate`): RANDOM and TBRC (Schulze's "tie-breaking
ranking of the candidates": untie with the ballots of randomly chosen voters,
then randomly). Concord adds the deterministic "index" rule (lower candidate
index first), which is the default so that rankings are reproducible without a seed.

Framework-free (numpy only), so it runs on any worker and is easy to test.
See docs/welfare.md for formulas and the axioms each method satisfies.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FloatMatrix = np.ndarray  # shape (participants, candidates), float64

# The one list of tie-break rules: name -> label (Arm's choices and the commands' options are built from it).
TIE_BREAK_LABELS: dict[str, str] = {
    "index": "Lower index",
    "random": "Seeded random",
    "tbrc": "TBRC (seeded ballots)",
}
TIE_BREAKS = tuple(TIE_BREAK_LABELS)


@dataclass
class WelfareResult:
    # Candidate indices, best first.
    ranking: list[int]
    # Welfare per candidate index (higher is better).
    welfare: list[float]
    method: str = "utilitarian"
    alpha: float = 1.0
    tie_break: str = "index"
    seed: int | None = 0
    # Social rank per candidate index *before* tie-breaking: 0 is best and tied
    # candidates share a level (the Habermas Machine's "social ranking with ties").
    levels: list[int] = field(default_factory=list)

    @property
    def winner(self) -> int:
        return self.ranking[0]

    @property
    def winner_decided_by_tie_break(self) -> bool:
        """True when another candidate had exactly the winner's welfare."""
        top = self.levels[self.ranking[0]]
        return sum(1 for level in self.levels if level == top) > 1


# --- input validation -------------------------------------------------------------


def _as_matrix(scores: Sequence[Sequence[float]] | np.ndarray) -> FloatMatrix:
    """Validate scores and return them as a float matrix, with messages that name the bad cell."""
    if isinstance(scores, np.ndarray):
        if scores.ndim != 2:
            raise ValueError(f"scores must be a 2-D matrix (participants x candidates), got {scores.ndim} dimension(s)")
        rows: Sequence[Any] = list(scores)
    elif isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise ValueError("scores must be a sequence of per-participant sequences of numbers")
    else:
        rows = scores
    if len(rows) == 0:
        raise ValueError("scores is empty: need at least one participant")
    width: int | None = None
    matrix: list[list[float]] = []
    for p, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise ValueError(f"scores[{p}] must be a sequence of numbers, got {type(row).__name__}")
        if width is None:
            width = len(row)
            if width == 0:
                raise ValueError("scores has no candidates: each participant needs at least one score")
        elif len(row) != width:
            raise ValueError(f"scores is ragged: participant 0 has {width} scores but participant {p} has {len(row)}")
        values: list[float] = []
        for c, value in enumerate(row):
            # bool is a Real subclass, but True/False as a Likert score is a caller bug.
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"scores[{p}][{c}] is not a number: {value!r}")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"scores[{p}][{c}] is not finite: {number!r}")
            values.append(number)
        matrix.append(values)
    return np.asarray(matrix, dtype=np.float64)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if math.isnan(alpha):
        raise ValueError("alpha is NaN")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (inequality aversion), got {alpha}")
    return alpha


def _require_positive(matrix: FloatMatrix, method: str) -> None:
    if (matrix <= 0).any():
        p, c = (int(i) for i in np.argwhere(matrix <= 0)[0])
        raise ValueError(
            f"{method} welfare needs positive scores (the Likert scale starts at 1); scores[{p}][{c}] = {matrix[p, c]}"
        )


# --- welfare functions ------------------------------------------------------------
# Each takes the validated (participants x candidates) matrix and alpha, and returns
# one welfare value per candidate. math.fsum keeps sums exactly rounded, so the
# welfare does not depend on the order of participants (symmetry holds bit for bit).


def utilitarian_welfare(matrix: FloatMatrix, alpha: float = 0.0) -> list[float]:
    n = matrix.shape[0]
    return [math.fsum(column) / n for column in matrix.T]


def rawlsian_welfare(matrix: FloatMatrix, alpha: float = 0.0) -> list[float]:
    return [float(column.min()) for column in matrix.T]


def nash_welfare(matrix: FloatMatrix, alpha: float = 1.0) -> list[float]:
    _require_positive(matrix, "nash")
    n = matrix.shape[0]
    return [math.exp(math.fsum(np.log(column)) / n) for column in matrix.T]


def isoelastic_welfare(matrix: FloatMatrix, alpha: float = 1.0) -> list[float]:
    """Generalised mean of order k = 1 - alpha: (mean u^k)^(1/k); geometric mean at k = 0.

    Computed as W = r * exp(log1p(mean(expm1(k * log(u / r)))) / k), with the
    reference r = min(u) when k < 0 and r = max(u) when k > 0, so every exponent
    k * log(u / r) is <= 0: nothing overflows for large alpha (where u^k would
    underflow to 0 and the naive formula divides by zero), and expm1/log1p keep
    full precision as k -> 0, so W is continuous through alpha = 1.
    """
    alpha = _check_alpha(alpha)
    if alpha == 0.0:
        return utilitarian_welfare(matrix)
    if alpha == 1.0:
        return nash_welfare(matrix)
    if math.isinf(alpha):
        return rawlsian_welfare(matrix)
    _require_positive(matrix, "isoelastic")
    k = 1.0 - alpha
    n = matrix.shape[0]
    welfare: list[float] = []
    for column in matrix.T:
        reference = float(column.min() if k < 0 else column.max())
        exponents = k * (np.log(column) - math.log(reference))
        mean_expm1 = math.fsum(np.expm1(exponents)) / n
        welfare.append(reference * math.exp(math.log1p(mean_expm1) / k))
    return welfare


def participant_ballots(matrix: FloatMatrix) -> np.ndarray:
    """Each participant's ballot as dense ranks (0 = most agreed with; equal scores share a rank).

    This is the Habermas Machine's ranking format: lower is better, ties allowed.
    """
    ballots = np.empty(matrix.shape, dtype=np.int64)
    for p, row in enumerate(matrix):
        ballots[p] = _dense_ascending(-row)
    return ballots


def borda_points(matrix: FloatMatrix) -> np.ndarray:
    """points[p, c]: candidates p scored below c, plus half of those p scored equal to c."""
    above = matrix[:, :, None] > matrix[:, None, :]  # [p, c, d]: p prefers c to d
    equal = matrix[:, :, None] == matrix[:, None, :]
    # Subtract 0.5 for the candidate itself, which `equal` counts on the diagonal.
    return above.sum(axis=2) + 0.5 * equal.sum(axis=2) - 0.5


def borda_welfare(matrix: FloatMatrix, alpha: float = 0.0) -> list[float]:
    points = borda_points(matrix)
    n = matrix.shape[0]
    # Points are multiples of 0.5, so these sums are exact.
    return [float(column.sum()) / n for column in points.T]


@dataclass
class SchulzeTables:
    # pairwise[c, d]: number of participants who score c strictly above d.
    pairwise: np.ndarray
    # strength[c, d]: strength of the strongest path from c to d (winning votes).
    strength: np.ndarray
    # beats[c, d]: c is ranked above d by the Schulze relation (strength[c, d] > strength[d, c]).
    beats: np.ndarray


def schulze_tables(matrix: FloatMatrix) -> SchulzeTables:
    """Pairwise preferences and strongest paths, as in Schulze (2011) and electowiki's description.

    A link c -> d exists when more participants prefer c to d than d to c, with
    strength = the number preferring c (winning votes, as in the Habermas Machine's
    `_compute_strongest_path_strengths`). Strongest paths by Floyd-Warshall on the
    widest-path semiring, vectorised over numpy rows.
    """
    pairwise = (matrix[:, :, None] > matrix[:, None, :]).sum(axis=0).astype(np.int64)
    strength = np.where(pairwise > pairwise.T, pairwise, 0)
    for via in range(strength.shape[0]):
        # A path through `via` is as strong as its weaker half.
        through = np.minimum(strength[:, via : via + 1], strength[via : via + 1, :])
        strength = np.maximum(strength, through)
    np.fill_diagonal(strength, 0)
    beats = strength > strength.T
    return SchulzeTables(pairwise=pairwise, strength=strength, beats=beats)


def schulze_welfare(matrix: FloatMatrix, alpha: float = 0.0) -> list[float]:
    """The Habermas Machine's level order: the fewer candidates beat c, the higher c's level.

    Welfare = the number of other candidates d with strength[c, d] >= strength[d, c]
    (the Habermas Machine's `weakly_preferred_count`, less the candidate itself), so
    the dense levels equal its `social_ranking` with ties. The relation is transitive
    (Schulze 2011, section 4.1), so this extends it.
    """
    tables = schulze_tables(matrix)
    n = tables.beats.shape[0]
    beaten_by = tables.beats.sum(axis=0)
    return [float(n - 1 - count) for count in beaten_by]


def schulze_wins_welfare(matrix: FloatMatrix, alpha: float = 0.0) -> list[float]:
    """Concord's earlier order: by how many other candidates c beats in the Schulze relation.

    The Schulze relation is transitive, so if c beats d then c beats everything d beats,
    plus d: counting wins also orders candidates consistently with the relation, and
    incomparable candidates can share a count. It differs from `schulze_welfare` when an
    unbeaten candidate beats fewer others than another unbeaten one.
    """
    tables = schulze_tables(matrix)
    return [float(count) for count in tables.beats.sum(axis=1)]


WelfareFunction = Callable[[FloatMatrix, float], list[float]]

# The registry of welfare functions: name -> (function, label). Arm's choices, the commands'
# options and the monitor's columns are all built from it, so a name exists only here.
WELFARE_METHODS: dict[str, tuple[WelfareFunction, str]] = {
    "utilitarian": (utilitarian_welfare, "Utilitarian (mean)"),
    "rawlsian": (rawlsian_welfare, "Rawlsian (minimum)"),
    "nash": (nash_welfare, "Nash (geometric mean)"),
    "isoelastic": (isoelastic_welfare, "Isoelastic (inequality-averse, alpha)"),
    "borda": (borda_welfare, "Borda"),
    "schulze": (schulze_welfare, "Schulze (Habermas Machine order: fewest beaten by)"),
    "schulze_wins": (schulze_wins_welfare, "Schulze (most candidates beaten)"),
}
# Methods that rank by the Schulze relation (the monitor explains them with strongest paths).
SCHULZE_METHODS = frozenset({"schulze", "schulze_wins"})
WELFARE_FUNCTIONS: dict[str, WelfareFunction] = {name: function for name, (function, _) in WELFARE_METHODS.items()}
WELFARE_LABELS: dict[str, str] = {name: label for name, (_, label) in WELFARE_METHODS.items()}


# --- ranking and tie-breaking -----------------------------------------------------


def _dense_ascending(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Dense ranks, 0 for the smallest value; equal values share a rank."""
    _, inverse = np.unique(np.asarray(values), return_inverse=True)
    return inverse.astype(np.int64)


def _dense_levels(welfare: Sequence[float]) -> np.ndarray:
    """0 for the highest welfare; exactly equal welfare shares a level."""
    return _dense_ascending(-np.asarray(welfare, dtype=np.float64))


def _untie_with_ballot(levels: np.ndarray, ballot: np.ndarray) -> np.ndarray:
    """Refine tied levels by a ballot (lower is better) without reordering untied candidates.

    Same construction as the Habermas Machine's `untie_ranking_with_ballot`:
    level * n + ballot rank, then renumber densely.
    """
    combined = _dense_ascending(levels) * len(levels) + _dense_ascending(ballot)
    return _dense_ascending(combined)


def _is_untied(levels: np.ndarray) -> bool:
    return np.unique(levels).size == levels.size


def _break_ties(levels: np.ndarray, matrix: FloatMatrix, tie_break: str, seed: int | None) -> list[int]:
    if tie_break == "index":
        # Stable sort: equal levels keep index order.
        return [int(i) for i in np.argsort(levels, kind="stable")]
    rng = np.random.default_rng(seed)
    untied = levels.copy()
    if tie_break == "tbrc" and not _is_untied(untied):
        # TBRC: walk through the participants' ballots in random order, each one
        # refining the ties that remain, until none do.
        ballots = participant_ballots(matrix)
        rng.shuffle(ballots)
        for ballot in ballots:
            untied = _untie_with_ballot(untied, ballot)
            if _is_untied(untied):
                break
    if not _is_untied(untied):
        # "random", or TBRC when every ballot left some tie: a uniformly random ballot.
        random_ballot = np.arange(untied.size)
        rng.shuffle(random_ballot)
        untied = _untie_with_ballot(untied, random_ballot)
    return [int(i) for i in np.argsort(untied, kind="stable")]


def rank_candidates(
    scores: Sequence[Sequence[float]] | np.ndarray,
    *,
    method: str = "utilitarian",
    alpha: float = 1.0,
    tie_break: str = "index",
    seed: int | None = 0,
) -> WelfareResult:
    """Rank candidates by social welfare of the participants' (predicted) agreement.

    scores[p][c] is participant p's agreement with candidate c. `alpha` is used by
    "isoelastic" only (it is validated for every method so a bad arm config fails
    loudly). `tie_break` is "index" (deterministic, lower index first), "random"
    or "tbrc" (both seeded by `seed`; see the module docstring).
    """
    if method not in WELFARE_FUNCTIONS:
        raise ValueError(f"unknown welfare method {method!r}; known: {', '.join(WELFARE_FUNCTIONS)}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; known: {', '.join(TIE_BREAKS)}")
    alpha = _check_alpha(alpha)
    matrix = _as_matrix(scores)
    welfare = WELFARE_FUNCTIONS[method](matrix, alpha)
    levels = _dense_levels(welfare)
    ranking = _break_ties(levels, matrix, tie_break, seed)
    return WelfareResult(
        ranking=ranking,
        welfare=[float(w) for w in welfare],
        method=method,
        alpha=alpha,
        tie_break=tie_break,
        seed=seed,
        levels=[int(level) for level in levels],
    )


# --- explanation ------------------------------------------------------------------


@dataclass
class ChoiceExplanation:
    """Why the top candidate won, for the researcher monitor."""

    method: str
    winner: int
    winner_welfare: float
    runner_up: int | None
    runner_up_welfare: float | None
    decided_by_tie_break: bool
    # The winner's predicted agreement across the group.
    winner_mean: float
    winner_min: float
    worst_off_participant: int
    # Head to head with the runner-up: who scores which one higher.
    prefer_winner: int
    prefer_runner_up: int
    indifferent: int
    text: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _format(value: float) -> str:
    return f"{value:.2f}"


def _method_phrase(method: str, alpha: float) -> str:
    return {
        "utilitarian": "mean predicted agreement",
        "rawlsian": "lowest predicted agreement in the group",
        "nash": "geometric-mean predicted agreement",
        "isoelastic": f"isoelastic welfare (alpha={alpha:g})",
        "borda": "mean Borda points",
        "schulze": "number of other candidates that do not beat it (Schulze, Habermas Machine order)",
        "schulze_wins": "number of candidates beaten (Schulze)",
    }[method]


def describe_choice(
    scores: Sequence[Sequence[float]] | np.ndarray,
    result: WelfareResult,
    *,
    candidate_labels: Sequence[Any] | None = None,
    participant_labels: Sequence[Any] | None = None,
) -> ChoiceExplanation:
    """Structured explanation of `result`'s winner against the runner-up.

    Fields hold candidate/participant indices; the labels (e.g. database ids) only
    change how the text names them.
    """
    matrix = _as_matrix(scores)
    candidate_name = (lambda c: candidate_labels[c]) if candidate_labels is not None else (lambda c: c)
    participant_name = (lambda p: participant_labels[p]) if participant_labels is not None else (lambda p: p)
    if matrix.shape[1] != len(result.welfare):
        raise ValueError(f"scores have {matrix.shape[1]} candidates but the result ranks {len(result.welfare)}")
    winner = result.ranking[0]
    runner_up = result.ranking[1] if len(result.ranking) > 1 else None
    column = matrix[:, winner]
    worst_off = int(np.argmin(column))
    sentences = [
        f"Candidate {candidate_name(winner)} won on {_method_phrase(result.method, result.alpha)}: "
        f"{_format(result.welfare[winner])}"
    ]
    prefer_winner = prefer_runner_up = indifferent = 0
    runner_up_welfare: float | None = None
    if runner_up is not None:
        runner_up_welfare = result.welfare[runner_up]
        sentences[0] += f" vs {_format(runner_up_welfare)} for the runner-up, candidate {candidate_name(runner_up)}"
        prefer_winner = int((matrix[:, winner] > matrix[:, runner_up]).sum())
        prefer_runner_up = int((matrix[:, winner] < matrix[:, runner_up]).sum())
        indifferent = matrix.shape[0] - prefer_winner - prefer_runner_up
    sentences[0] += "."
    if result.winner_decided_by_tie_break:
        sentences.append(f"Its welfare was tied; the '{result.tie_break}' tie-break chose it.")
    worst_score = _format(float(column[worst_off]))
    sentences.append(
        f"Mean predicted agreement {_format(math.fsum(column) / len(column))}; "
        f"the worst-off member (participant {participant_name(worst_off)}) is predicted at {worst_score} of 7."
    )
    if runner_up is not None:
        sentences.append(
            f"Head to head, {prefer_winner} participant(s) prefer it to the runner-up, "
            f"{prefer_runner_up} prefer the runner-up, {indifferent} are indifferent."
        )
        if result.method in SCHULZE_METHODS:
            tables = schulze_tables(matrix)
            forward = int(tables.strength[winner, runner_up])
            backward = int(tables.strength[runner_up, winner])
            first, second = candidate_name(winner), candidate_name(runner_up)
            sentences.append(
                f"Strongest path {first}->{second} has strength {forward}, {second}->{first} has {backward}."
            )
    return ChoiceExplanation(
        method=result.method,
        winner=winner,
        winner_welfare=result.welfare[winner],
        runner_up=runner_up,
        runner_up_welfare=runner_up_welfare,
        decided_by_tie_break=result.winner_decided_by_tie_break,
        winner_mean=math.fsum(column) / len(column),
        winner_min=float(column.min()),
        worst_off_participant=worst_off,
        prefer_winner=prefer_winner,
        prefer_runner_up=prefer_runner_up,
        indifferent=indifferent,
        text=" ".join(sentences),
    )


def explain_choice(
    scores: Sequence[Sequence[float]] | np.ndarray,
    result: WelfareResult,
    *,
    candidate_labels: Sequence[Any] | None = None,
    participant_labels: Sequence[Any] | None = None,
) -> str:
    """One paragraph on why the top candidate won (see describe_choice for the fields)."""
    return describe_choice(
        scores, result, candidate_labels=candidate_labels, participant_labels=participant_labels
    ).text

"""Welfare functions: worked numbers, social-choice axioms (property-based), input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modeling.welfare import (
    TIE_BREAKS,
    WELFARE_FUNCTIONS,
    WelfareResult,
    describe_choice,
    explain_choice,
    participant_ballots,
    rank_candidates,
    schulze_tables,
)

METHODS = sorted(WELFARE_FUNCTIONS)

# Predicted agreement on a half-point grid of the 1-7 scale: realistic, and coarse
# enough that distinct welfare values are distinct in floating point.
likert = st.integers(min_value=2, max_value=14).map(lambda half_points: half_points / 2)


@st.composite
def score_matrices(
    draw, min_participants: int = 1, max_participants: int = 6, min_candidates: int = 2, max_candidates: int = 6
):
    participants = draw(st.integers(min_participants, max_participants))
    candidates = draw(st.integers(min_candidates, max_candidates))
    return [[draw(likert) for _ in range(candidates)] for _ in range(participants)]


def _position(result: WelfareResult, candidate: int) -> int:
    return result.ranking.index(candidate)


def _ballots_to_scores(votes: list[tuple[int, str]], letters: str) -> list[list[float]]:
    """Expand (count, 'ACBED') ballots into score rows: first place gets the highest score."""
    rows: list[list[float]] = []
    for count, order in votes:
        row = [0.0] * len(letters)
        for position, letter in enumerate(order):
            row[letters.index(letter)] = float(len(letters) - position)
        rows.extend([row] * count)
    return rows


def _letters(ranking: list[int], letters: str) -> str:
    return "".join(letters[i] for i in ranking)


# --- worked numbers -----------------------------------------------------------------

SCORES = [
    [1.0, 7.0, 4.0],
    [2.0, 6.0, 4.0],
    [7.0, 1.0, 4.5],
]


def test_utilitarian_is_the_mean():
    result = rank_candidates(SCORES, method="utilitarian")
    assert result.welfare == pytest.approx([10 / 3, 14 / 3, 12.5 / 3])
    assert result.ranking == [1, 2, 0]


def test_rawlsian_is_the_minimum_and_ties_go_to_the_lower_index():
    result = rank_candidates(SCORES, method="rawlsian")
    assert result.welfare == [1.0, 1.0, 4.0]
    assert result.ranking == [2, 0, 1]
    assert result.levels == [1, 1, 0]


def test_nash_is_the_geometric_mean():
    result = rank_candidates(SCORES, method="nash")
    assert result.welfare == pytest.approx([14 ** (1 / 3), 42 ** (1 / 3), 72 ** (1 / 3)])
    assert result.ranking == [2, 1, 0]


def test_isoelastic_alpha_2_is_the_harmonic_mean():
    result = rank_candidates(SCORES, method="isoelastic", alpha=2.0)
    harmonic = [3 / sum(1 / s[c] for s in SCORES) for c in range(3)]
    assert result.welfare == pytest.approx(harmonic)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9, 1.5, 3.0, 7.0])
def test_isoelastic_matches_the_generalised_mean_formula(alpha: float):
    result = rank_candidates(SCORES, method="isoelastic", alpha=alpha)
    order = 1 - alpha
    expected = [(sum(s[c] ** order for s in SCORES) / 3) ** (1 / order) for c in range(3)]
    assert result.welfare == pytest.approx(expected, rel=1e-12)


def test_isoelastic_special_cases_and_continuity_at_alpha_1():
    mean = rank_candidates(SCORES, method="utilitarian").welfare
    geometric = rank_candidates(SCORES, method="nash").welfare
    minimum = rank_candidates(SCORES, method="rawlsian").welfare
    assert rank_candidates(SCORES, method="isoelastic", alpha=0.0).welfare == mean
    assert rank_candidates(SCORES, method="isoelastic", alpha=1.0).welfare == geometric
    assert rank_candidates(SCORES, method="isoelastic", alpha=math.inf).welfare == minimum
    for near_one in (1 - 1e-9, 1 + 1e-9):
        assert rank_candidates(SCORES, method="isoelastic", alpha=near_one).welfare == pytest.approx(
            geometric, rel=1e-8
        )


@pytest.mark.parametrize("alpha", [50.0, 1e3, 1e6, 1e12, 1e300])
def test_isoelastic_is_finite_and_close_to_the_minimum_for_huge_alpha(alpha: float):
    welfare = rank_candidates(SCORES, method="isoelastic", alpha=alpha).welfare
    assert all(math.isfinite(w) for w in welfare)
    # W lies in [min, min * n^(1/(alpha-1))].
    for w, low in zip(welfare, [1.0, 1.0, 4.0]):
        assert low <= w <= low * 3 ** (1 / (alpha - 1)) + 1e-12


def test_isoelastic_welfare_decreases_with_alpha():
    # The generalised mean is non-increasing in its order 1 - alpha.
    column = [[1.5], [3.0], [6.5], [7.0]]
    welfares = [rank_candidates(column, method="isoelastic", alpha=a).welfare[0] for a in (0, 0.5, 1, 2, 5, 20, 200)]
    assert all(a > b for a, b in zip(welfares, welfares[1:]))


def test_borda_counts_half_points_for_ties():
    # Participant 0: c0 > c1 = c2 -> points 2, 0.5, 0.5. Participant 1: c2 > c1 > c0 -> 0, 1, 2.
    result = rank_candidates([[5.0, 3.0, 3.0], [1.0, 2.0, 3.0]], method="borda")
    assert result.welfare == [1.0, 0.75, 1.25]
    assert result.ranking == [2, 0, 1]


def test_participant_ballots_are_dense_ranks_with_ties():
    ballots = participant_ballots(np.array([[5.0, 3.0, 3.0, 7.0]]))
    assert ballots.tolist() == [[1, 2, 2, 0]]


# --- Schulze worked examples (Schulze 2011; the first is Wikipedia's 45-voter example) ---

SCHULZE_EXAMPLES = [
    pytest.param(
        [
            (5, "ACBED"),
            (5, "ADECB"),
            (8, "BEDAC"),
            (3, "CABED"),
            (7, "CAEBD"),
            (2, "CBADE"),
            (7, "DCEBA"),
            (8, "EBADC"),
        ],
        "ABCDE",
        "EACBD",
        id="wikipedia-45-voters",
    ),
    pytest.param(
        [
            (5, "ACBD"),
            (2, "ACDB"),
            (3, "ADCB"),
            (4, "BACD"),
            (3, "CBDA"),
            (3, "CDBA"),
            (1, "DACB"),
            (5, "DBAC"),
            (4, "DCBA"),
        ],
        "ABCD",
        "DACB",
        id="schulze-example-2-30-voters",
    ),
    pytest.param(
        [
            (3, "ABDEC"),
            (5, "ADEBC"),
            (1, "ADECB"),
            (2, "BADEC"),
            (2, "BDECA"),
            (4, "CABDE"),
            (6, "CBADE"),
            (2, "DBECA"),
            (5, "DECAB"),
        ],
        "ABCDE",
        "BADEC",
        id="schulze-example-3-30-voters",
    ),
]


@pytest.mark.parametrize("votes, letters, expected", SCHULZE_EXAMPLES)
def test_schulze_reproduces_published_examples(votes, letters, expected):
    result = rank_candidates(_ballots_to_scores(votes, letters), method="schulze")
    assert _letters(result.ranking, letters) == expected
    assert not result.winner_decided_by_tie_break


def test_schulze_wikipedia_pairwise_and_strongest_paths():
    votes = SCHULZE_EXAMPLES[0].values[0]
    tables = schulze_tables(np.array(_ballots_to_scores(votes, "ABCDE")))
    # d[*,*] and p[*,*] as printed in the Wikipedia article.
    assert tables.pairwise.tolist() == [
        [0, 20, 26, 30, 22],
        [25, 0, 16, 33, 18],
        [19, 29, 0, 17, 24],
        [15, 12, 28, 0, 14],
        [23, 27, 21, 31, 0],
    ]
    assert tables.strength.tolist() == [
        [0, 28, 28, 30, 24],
        [25, 0, 28, 33, 24],
        [25, 29, 0, 29, 24],
        [25, 28, 28, 0, 24],
        [25, 28, 28, 31, 0],
    ]


def test_schulze_example_4_ties_and_each_tie_break():
    # Schulze (2011) example 4: B ~ D ahead of A ~ C.
    scores = _ballots_to_scores([(3, "ABCD"), (2, "DABC"), (2, "DBCA"), (2, "CBDA")], "ABCD")
    result = rank_candidates(scores, method="schulze")
    assert result.levels == [1, 0, 1, 0]
    assert _letters(result.ranking, "ABCD") == "BDAC"
    assert result.winner_decided_by_tie_break
    for tie_break in ("random", "tbrc"):
        for seed in range(5):
            ranked = rank_candidates(scores, method="schulze", tie_break=tie_break, seed=seed)
            assert set(_letters(ranked.ranking[:2], "ABCD")) == {"B", "D"}
            assert set(_letters(ranked.ranking[2:], "ABCD")) == {"A", "C"}
            # Seeded: the same seed gives the same order.
            assert rank_candidates(scores, method="schulze", tie_break=tie_break, seed=seed).ranking == ranked.ranking


def test_tbrc_breaks_ties_by_a_participants_ballot():
    # Candidates 0 and 1 tie on the mean; the only participant with a strict
    # preference between them prefers 1, and TBRC consults ballots before chance.
    scores = [[4.0, 4.0, 1.0], [3.0, 5.0, 1.0], [5.0, 3.0, 1.0], [4.0, 4.0, 1.0]]
    # Two participants disagree, so the order depends on which ballot is drawn first,
    # but only those two ballots can break the tie: both outcomes must show up over seeds.
    winners = {rank_candidates(scores, tie_break="tbrc", seed=seed).ranking[0] for seed in range(20)}
    assert winners == {0, 1}
    one_voter = [[3.0, 5.0, 1.0], [4.0, 4.0, 1.0]]
    assert {rank_candidates(one_voter, tie_break="tbrc", seed=s).ranking[0] for s in range(20)} == {1}


def test_random_tie_break_can_pick_either_tied_candidate():
    scores = [[4.0, 4.0, 1.0]]
    winners = {rank_candidates(scores, tie_break="random", seed=seed).ranking[0] for seed in range(30)}
    assert winners == {0, 1}


# --- properties ---------------------------------------------------------------------


@st.composite
def dominance_cases(draw, strict_everywhere: bool):
    """A score matrix where candidate `better` Pareto-dominates candidate `worse`."""
    scores = draw(score_matrices(min_candidates=2))
    participants, candidates = len(scores), len(scores[0])
    better, worse = draw(st.permutations(range(candidates)))[:2]
    for p in range(participants):
        low = draw(st.integers(2, 13)) / 2
        gain = draw(st.integers(1 if strict_everywhere else 0, int((7 - low) * 2))) / 2
        scores[p][worse], scores[p][better] = low, low + gain
    if not strict_everywhere:
        strict = draw(st.integers(0, participants - 1))
        if scores[strict][better] == scores[strict][worse]:
            if scores[strict][better] < 7:
                scores[strict][better] += 0.5
            else:
                scores[strict][worse] -= 0.5
    return scores, better, worse


STRONG_PARETO_METHODS = ["utilitarian", "nash", "isoelastic", "borda", "schulze", "schulze_wins"]


@settings(max_examples=150, deadline=None)
@given(
    case=dominance_cases(strict_everywhere=False), method=st.sampled_from(STRONG_PARETO_METHODS), alpha=st.floats(0, 8)
)
def test_strong_pareto(case, method, alpha):
    """Weakly better for everyone and strictly for someone -> ranked strictly above."""
    scores, better, worse = case
    result = rank_candidates(scores, method=method, alpha=alpha)
    assert result.welfare[better] > result.welfare[worse]
    assert _position(result, better) < _position(result, worse)


@settings(max_examples=100, deadline=None)
@given(case=dominance_cases(strict_everywhere=False))
def test_rawlsian_weak_dominance_never_lowers_welfare(case):
    # The minimum satisfies only weak Pareto: a strict gain for a member who is not
    # worst-off can leave the minimum unchanged, so the welfare may tie.
    scores, better, worse = case
    result = rank_candidates(scores, method="rawlsian")
    assert result.welfare[better] >= result.welfare[worse]


@settings(max_examples=100, deadline=None)
@given(case=dominance_cases(strict_everywhere=True), method=st.sampled_from(METHODS), alpha=st.floats(0, 8))
def test_weak_pareto_for_every_method(case, method, alpha):
    """Strictly better for every participant -> ranked strictly above, whatever the method."""
    scores, better, worse = case
    result = rank_candidates(scores, method=method, alpha=alpha)
    assert _position(result, better) < _position(result, worse)


@settings(max_examples=150, deadline=None)
@given(
    scores=score_matrices(min_participants=2), method=st.sampled_from(METHODS), alpha=st.floats(0, 50), data=st.data()
)
def test_symmetric_under_participant_permutation(scores, method, alpha, data):
    order = data.draw(st.permutations(range(len(scores))))
    permuted = [scores[p] for p in order]
    original = rank_candidates(scores, method=method, alpha=alpha)
    shuffled = rank_candidates(permuted, method=method, alpha=alpha)
    # fsum makes welfare exactly order-independent, so rankings match, ties included.
    assert shuffled.welfare == original.welfare
    assert shuffled.ranking == original.ranking


@settings(max_examples=150, deadline=None)
@given(scores=score_matrices())
def test_alpha_zero_ranks_like_the_mean(scores):
    isoelastic = rank_candidates(scores, method="isoelastic", alpha=0.0)
    utilitarian = rank_candidates(scores, method="utilitarian")
    assert isoelastic.ranking == utilitarian.ranking
    # And a tiny alpha orders candidates whose means differ visibly the same way.
    nearly = rank_candidates(scores, method="isoelastic", alpha=1e-9).welfare
    means = utilitarian.welfare
    for a in range(len(means)):
        for b in range(len(means)):
            if means[a] > means[b] + 1e-6:
                assert nearly[a] > nearly[b]


@settings(max_examples=150, deadline=None)
@given(scores=score_matrices(), alpha=st.sampled_from([1e4, 1e6, 1e9, 1e100]))
def test_huge_alpha_orders_like_the_minimum(scores, alpha):
    isoelastic = rank_candidates(scores, method="isoelastic", alpha=alpha).welfare
    minimum = rank_candidates(scores, method="rawlsian").welfare
    for a in range(len(minimum)):
        for b in range(len(minimum)):
            # Distinct minima (>= half a point apart here) must be ordered as the minima are.
            if minimum[a] > minimum[b]:
                assert isoelastic[a] > isoelastic[b]


@settings(max_examples=100, deadline=None)
@given(scores=score_matrices(), method=st.sampled_from(METHODS), alpha=st.floats(0, 10))
def test_ranking_is_a_permutation_consistent_with_welfare(scores, method, alpha):
    result = rank_candidates(scores, method=method, alpha=alpha)
    assert sorted(result.ranking) == list(range(len(scores[0])))
    ranked_welfare = [result.welfare[c] for c in result.ranking]
    assert ranked_welfare == sorted(ranked_welfare, reverse=True)
    # Index tie-break: within equal welfare, lower index first.
    for first, second in zip(result.ranking, result.ranking[1:]):
        if result.welfare[first] == result.welfare[second]:
            assert first < second


@settings(max_examples=60, deadline=None)
@given(
    scores=score_matrices(),
    method=st.sampled_from(METHODS),
    tie_break=st.sampled_from(TIE_BREAKS),
    seed=st.integers(0, 2**32),
)
def test_every_tie_break_respects_welfare_levels_and_is_seeded(scores, method, tie_break, seed):
    result = rank_candidates(scores, method=method, tie_break=tie_break, seed=seed)
    levels_in_order = [result.levels[c] for c in result.ranking]
    assert levels_in_order == sorted(levels_in_order)
    assert rank_candidates(scores, method=method, tie_break=tie_break, seed=seed).ranking == result.ranking


@settings(max_examples=60, deadline=None)
@given(scores=score_matrices(min_participants=1, max_participants=5))
def test_schulze_elects_the_condorcet_winner_when_there_is_one(scores):
    matrix = np.array(scores)
    candidates = matrix.shape[1]
    wins = (matrix[:, :, None] > matrix[:, None, :]).sum(axis=0)
    condorcet = [c for c in range(candidates) if all(wins[c, d] > wins[d, c] for d in range(candidates) if d != c)]
    assume(condorcet)
    assert rank_candidates(scores, method="schulze").ranking[0] == condorcet[0]


# --- explanation --------------------------------------------------------------------


def test_explanation_names_winner_runner_up_and_worst_off_member():
    result = rank_candidates(SCORES, method="utilitarian")
    details = describe_choice(SCORES, result)
    assert (details.winner, details.runner_up) == (1, 2)
    assert details.worst_off_participant == 2
    assert details.winner_min == 1.0
    assert (details.prefer_winner, details.prefer_runner_up, details.indifferent) == (2, 1, 0)
    assert not details.decided_by_tie_break
    text = explain_choice(SCORES, result)
    assert "Candidate 1" in text and "4.67" in text and "participant 2" in text
    assert details.as_dict()["winner"] == 1


def test_explanation_reports_a_tie_break_and_schulze_paths():
    scores = _ballots_to_scores([(3, "ABCD"), (2, "DABC"), (2, "DBCA"), (2, "CBDA")], "ABCD")
    result = rank_candidates(scores, method="schulze")
    details = describe_choice(scores, result)
    assert details.decided_by_tie_break
    assert "tie-break" in details.text and "Strongest path" in details.text


def test_explanation_with_a_single_candidate():
    result = rank_candidates([[3.0], [5.0]], method="nash")
    details = describe_choice([[3.0], [5.0]], result)
    assert details.runner_up is None and details.winner == 0


# --- input errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, message",
    [
        ([], "empty"),
        ([[]], "no candidates"),
        ([[1.0, 2.0], [3.0]], "ragged"),
        ([[1.0, float("nan")]], "not finite"),
        ([[1.0, float("inf")]], "not finite"),
        ([[1.0, "2"]], "not a number"),
        ([[1.0, True]], "not a number"),
        ("1,2,3", "sequence"),
        ([5.0], "sequence of numbers"),
        (np.ones(3), "2-D"),
    ],
)
def test_bad_scores_raise_value_error(scores, message):
    with pytest.raises(ValueError, match=message):
        rank_candidates(scores)


def test_bad_parameters_raise_value_error():
    with pytest.raises(ValueError, match="unknown welfare method 'mean'.*utilitarian"):
        rank_candidates(SCORES, method="mean")
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        rank_candidates(SCORES, method="isoelastic", alpha=-0.5)
    with pytest.raises(ValueError, match="alpha is NaN"):
        rank_candidates(SCORES, method="isoelastic", alpha=float("nan"))
    with pytest.raises(ValueError, match="unknown tie_break"):
        rank_candidates(SCORES, tie_break="coin")
    with pytest.raises(ValueError, match="positive scores"):
        rank_candidates([[0.0, 2.0]], method="nash")
    with pytest.raises(ValueError, match="positive scores"):
        rank_candidates([[-1.0, 2.0]], method="isoelastic", alpha=2.0)


def test_numpy_input_is_accepted():
    assert rank_candidates(np.array(SCORES)).ranking == rank_candidates(SCORES).ranking

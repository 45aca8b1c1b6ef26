"""The Habermas Machine's own Schulze test cases, run against Concord's `schulze` welfare method.

Ported from google-deepmind/habermas_machine, habermas_machine/social_choice/schulze_method_test.py
(Copyright 2025 Google LLC / Google DeepMind, licensed under the Apache License, Version 2.0:
http://www.apache.org/licenses/LICENSE-2.0). The rankings, pairwise defeats, strongest path strengths,
social rankings and seeded untied rankings below are copied from that file; the electowiki examples
come from https://electowiki.org/wiki/Schulze_method, the Figure 1 rounds from the Habermas Machine
paper (Tessler et al. 2024). Changes: the cases are expressed for Concord's API (scores are agreement,
higher is better, so a Habermas Machine ranking r becomes the scores -r; an untied ranking, rank per
candidate, becomes Concord's order of candidates, best first).
"""

from __future__ import annotations

import numpy as np
import pytest

from modeling.welfare import rank_candidates, schulze_tables

# (name, rankings [voter][candidate] with 0 = best, pairwise defeats, strongest path strengths, social ranking with ties)
HM_SCHULZE_CASES = [
    (
        "Example 1 (30 voters, 4 candidates)",
        5 * [[0, 2, 1, 3]] + 2 * [[0, 3, 1, 2]] + 3 * [[0, 3, 2, 1]] + 4 * [[1, 0, 2, 3]] + 3 * [[3, 1, 0, 2]]
        + 3 * [[3, 2, 0, 1]] + 1 * [[1, 3, 2, 0]] + 5 * [[2, 1, 3, 0]] + 4 * [[3, 2, 1, 0]],
        [[0, 11, 20, 14], [19, 0, 9, 12], [10, 21, 0, 17], [16, 18, 13, 0]],
        [[0, 20, 20, 17], [19, 0, 19, 17], [19, 21, 0, 17], [18, 18, 18, 0]],
        [1, 3, 2, 0],
    ),
    (
        "Example 2 (9 voters, 4 candidates)",
        3 * [[0, 1, 2, 3]] + 2 * [[1, 2, 3, 0]] + 2 * [[3, 1, 2, 0]] + 2 * [[3, 1, 0, 2]],
        [[0, 5, 5, 3], [4, 0, 7, 5], [4, 2, 0, 5], [6, 4, 4, 0]],
        [[0, 5, 5, 5], [5, 0, 7, 5], [5, 5, 0, 5], [6, 5, 5, 0]],
        [1, 0, 1, 0],
    ),
    (
        "Example 3 (2 voters, 4 candidates)",
        [[0, 0, 1, 2], [0, 1, 3, 2]],
        [[0, 1, 2, 2], [0, 0, 2, 2], [0, 0, 0, 1], [0, 0, 1, 0]],
        [[0, 1, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]],
        [0, 1, 2, 2],
    ),
    (
        "Example from MH (5 voters, 4 candidates)",
        2 * [[0, 1, 3, 2]] + [[1, 3, 2, 0]] + [[2, 3, 0, 1]] + [[2, 0, 3, 1]],
        [[0, 4, 4, 2], [1, 0, 3, 3], [1, 2, 0, 1], [3, 2, 4, 0]],
        [[0, 4, 4, 3], [3, 0, 3, 3], [0, 0, 0, 0], [3, 3, 4, 0]],
        [0, 1, 2, 0],
    ),
    (
        "Example for TBRC check (2 voters, 2 candidates)",
        [[0, 1], [1, 0]],
        [[0, 1], [1, 0]],
        [[0, 0], [0, 0]],
        [0, 0],
    ),
]


def _scores(rankings: list[list[int]]) -> list[list[float]]:
    """A Habermas Machine ranking (lower is better) as Concord agreement scores (higher is better)."""
    return [[float(-rank) for rank in ballot] for ballot in rankings]


@pytest.mark.parametrize("name, rankings, pairwise, strengths, social", HM_SCHULZE_CASES, ids=[c[0] for c in HM_SCHULZE_CASES])
def test_schulze_matches_the_habermas_machine(name, rankings, pairwise, strengths, social):
    tables = schulze_tables(np.array(_scores(rankings)))
    assert tables.pairwise.tolist() == pairwise
    assert tables.strength.tolist() == strengths
    assert rank_candidates(_scores(rankings), method="schulze").levels == social


@pytest.mark.parametrize(
    "rankings, social",
    [
        pytest.param([[1, 2, 3, 4], [2, 1, 4, 3], [4, 1, 2, 3], [2, 3, 4, 1], [3, 2, 4, 1]], [3, 1, 4, 2], id="Figure 1 opinion round"),
        pytest.param([[3, 1, 2, 2], [1, 3, 2, 2], [3, 2, 2, 1], [2, 3, 1, 1], [4, 2, 1, 3]], [3, 2, 1, 1], id="Figure 1 critique round"),
    ],
)
def test_schulze_reproduces_figure_1_of_the_paper(rankings, social):
    shifted = (np.array(rankings) - np.min(rankings)).tolist()
    expected = (np.array(social) - np.min(social)).tolist()
    assert rank_candidates(_scores(shifted), method="schulze").levels == expected


def _order(untied_ranking: list[int]) -> list[int]:
    """The Habermas Machine's untied ranking (rank per candidate) as candidates, best first."""
    return [int(c) for c in np.argsort(untied_ranking, kind="stable")]


@pytest.mark.parametrize(
    "case, seed, tie_break, untied",
    [
        (0, 0, "random", [1, 3, 2, 0]),
        (0, 0, "tbrc", [1, 3, 2, 0]),
        (3, 1, "tbrc", [1, 2, 3, 0]),
        (3, 1, "random", [0, 2, 3, 1]),
        (4, 0, "tbrc", [0, 1]),
        (4, 3, "tbrc", [1, 0]),
        (4, 0, "random", [0, 1]),
        (4, 3, "random", [1, 0]),
    ],
)
def test_seeded_tie_breaks_untie_as_the_habermas_machine_does(case, seed, tie_break, untied):
    _, rankings, _, _, social = HM_SCHULZE_CASES[case]
    result = rank_candidates(_scores(rankings), method="schulze", tie_break=tie_break, seed=seed)
    assert result.levels == social
    assert result.ranking == _order(untied)


def test_the_five_voter_example_where_the_two_orders_differ():
    # Habermas Machine: c0 and c3 unbeaten (level 0), then c1, then c2.
    rankings = HM_SCHULZE_CASES[3][1]
    hm = rank_candidates(_scores(rankings), method="schulze")
    assert hm.levels == [0, 1, 2, 0]
    assert hm.ranking == [0, 3, 1, 2]
    assert hm.winner_decided_by_tie_break  # c0 and c3 share the top level
    # Concord's earlier order, kept as `schulze_wins`: c0 beats two, c1 and c3 one each, c2 none.
    wins = rank_candidates(_scores(rankings), method="schulze_wins")
    assert wins.welfare == [2.0, 1.0, 0.0, 1.0]
    assert wins.ranking == [0, 1, 3, 2]

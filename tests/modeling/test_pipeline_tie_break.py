"""The arm's tie-break rule reaches the ranking of a round, seeded by the round's seed.

The constant reward model predicts the same agreement for every candidate, so every candidate
ties and the order comes from the tie-break alone. The stand-in generator writes the statements:
what is under test is the ranking, not the text.
"""

from __future__ import annotations

import pytest

from modeling.generation.standin import StandInGenerator
from modeling.pipeline import mediate
from modeling.reward.constant import ConstantRewardModel
from modeling.welfare import rank_candidates

OPINIONS = ["Tax the rich more.", "Taxes are high enough.", "Close loopholes first."]
N = 8


def _ranking(*, tie_break: str, seed: int) -> list[int]:
    result = mediate(
        question="Should we raise taxes on the rich?",
        opinions=OPINIONS,
        n=N,
        seed=seed,
        generator=StandInGenerator(),
        reward_model=ConstantRewardModel(),
        welfare_tie_break=tie_break,
    )
    assert len(set(result.welfare.levels)) == 1, "the constant model should tie every candidate"
    return list(result.welfare.ranking)


def test_index_keeps_the_order_of_generation() -> None:
    assert _ranking(tie_break="index", seed=1) == list(range(N))


@pytest.mark.parametrize("tie_break", ["random", "tbrc"])
def test_seeded_rules_are_reproducible_from_the_rounds_seed_and_vary_with_it(tie_break: str) -> None:
    rankings = {seed: _ranking(tie_break=tie_break, seed=seed) for seed in range(5)}
    for seed, ranking in rankings.items():
        assert sorted(ranking) == list(range(N))
        assert ranking == _ranking(tie_break=tie_break, seed=seed)
        predicted = [[4.0] * N for _ in OPINIONS]
        assert ranking == list(rank_candidates(predicted, tie_break=tie_break, seed=seed).ranking)
    # 8! orders: five seeds giving the generation order, or all one order, would mean the rule was ignored.
    assert any(ranking != list(range(N)) for ranking in rankings.values())
    assert len({tuple(r) for r in rankings.values()}) > 1


def test_an_unknown_rule_fails_loudly() -> None:
    with pytest.raises(ValueError, match="tie_break"):
        _ranking(tie_break="coin", seed=1)

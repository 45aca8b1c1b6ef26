"""The "none" reward model: no preference information at all.

An arm with reward model "none" still goes through the same pipeline, but every predicted agreement
is the scale's midpoint, so every welfare function ties all candidates and the tie-break (generation
order) decides. As each candidate is an independent sample, the statements shown are then simply the
first K of the N written: the no-reward-model baseline of an experiment.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import LIKERT_MAX, LIKERT_MIN, AgreementQuery

MIDPOINT = (LIKERT_MIN + LIKERT_MAX) / 2


class ConstantRewardModel:
    name = "none"
    version = f"constant-{MIDPOINT:g}"

    def predict(self, queries: Sequence[AgreementQuery]) -> list[float]:
        return [MIDPOINT] * len(queries)

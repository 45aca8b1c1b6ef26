"""The reward-model interface: predicted agreement on the 1-7 Likert scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import likert

# Predictions are floats on the members' scale.
LIKERT_MIN = float(likert.LIKERT_MIN)
LIKERT_MAX = float(likert.LIKERT_MAX)


@dataclass(frozen=True)
class AgreementQuery:
    """Would the author of `opinion` agree with `statement`, on `question`?"""

    question: str
    opinion: str
    statement: str


class RewardModel(Protocol):
    name: str
    version: str

    def predict(self, queries: Sequence[AgreementQuery]) -> list[float]:
        """Score every query in one batch; each score lies in [1, 7]."""
        ...

"""The reward-model interface: predicted agreement on the 1-7 Likert scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

LIKERT_MIN = 1.0
LIKERT_MAX = 7.0


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

"""The room monitor of an arm without a reward model does not pretend a statement won on welfare."""

from __future__ import annotations

import pytest

from deliberation import selectors, services
from deliberation.models import PredictedAgreement, Round
from modeling.reward.constant import MIDPOINT
from tests.research.study import mediate_with, write_opinions

pytestmark = pytest.mark.django_db


def test_a_constant_reward_model_is_explained_as_a_tie_broken_by_writing_order(experiment) -> None:
    arm = experiment.arms.get()
    arm.reward_model = "none"
    arm.save()
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_: Round = write_opinions(members)
    mediation = mediate_with(round_, {arm.pk: [[MIDPOINT] * 4] * 3})
    assert mediation is not None
    # study.scored_result records the reward model as "given"; the round's predictions here are the baseline's.
    PredictedAgreement.objects.filter(candidate__round=round_).update(reward_model="none")
    monitor = selectors.monitor_state(members[0].room)
    assert "won on mean predicted agreement" not in monitor.explanation
    assert "No reward model (none)" in monitor.explanation and "tie-break" in monitor.explanation
    assert all(len(row.welfare_by_method) == len(selectors.MONITOR_WELFARE_METHODS) for row in monitor.candidates)


def test_an_informative_reward_model_still_explains_the_winner(experiment) -> None:
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    mediate_with(round_, {experiment.arms.get().pk: [[5.0, 3.0, 4.0, 1.0], [2.0, 6.0, 3.0, 1.0], [4.0, 4.5, 2.0, 3.0]]})
    assert "won on mean predicted agreement" in selectors.monitor_state(members[0].room).explanation

"""The protocol's figures against hand computations (research/analytics_protocol.py)."""

from __future__ import annotations

import math

import pytest

from research.analytics_protocol import (
    GroupOutcome,
    MemberPositions,
    RevisionPair,
    ai_preference_share,
    ai_vs_human_agreement,
    load_protocol,
    position_figures,
    protocol_report,
    revision_agreement_difference,
    revision_preference_share,
    statement_position,
)
from tests.research.protocol_study import build_protocol_study

# Student t quantiles t(0.975, df) from printed tables; z(0.975).
T_975_DF1 = 12.706204736
T_975_DF2 = 4.302652730
Z_975 = 1.959963985


def test_revised_minus_first_agreement_is_paired_within_groups_and_intervalled_over_groups() -> None:
    pairs = [
        RevisionPair(1, 1, 3, 5), RevisionPair(1, 2, 4, 4),  # group 1: differences 2, 0 -> 1
        RevisionPair(2, 3, 5, 6), RevisionPair(2, 4, 2, 5), RevisionPair(2, 5, 4, 4),  # 1, 3, 0 -> 4/3
        RevisionPair(3, 6, 6, 5),  # -1
    ]
    result = revision_agreement_difference(pairs)
    means = [1.0, 4 / 3, -1.0]
    mean = sum(means) / 3  # 0.4444
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / 2)  # 1.26198
    half = T_975_DF2 * sd / math.sqrt(3)
    assert result.n == 3
    assert result.estimate == pytest.approx(0.444444, abs=1e-6)
    assert result.low == pytest.approx(mean - half, abs=1e-6) and result.low == pytest.approx(-2.690485, abs=1e-5)
    assert result.high == pytest.approx(3.579374, abs=1e-5)


def test_the_share_preferring_the_ai_mediator_has_a_wilson_interval() -> None:
    result = ai_preference_share([True] * 7 + [False] * 3)
    assert (result.estimate, result.n) == (0.7, 10)
    assert (result.low, result.high) == pytest.approx((0.396774, 0.892210), abs=1e-5)


def test_the_share_preferring_the_revision_has_a_wilson_interval() -> None:
    result = revision_preference_share([True] * 7 + [False] * 3)
    assert result.estimate == pytest.approx(0.7)
    # Wilson for 7 of 10: centre (0.7 + z²/20) / (1 + z²/10), half z·sqrt(0.021 + z²/400) / (1 + z²/10).
    denominator = 1 + Z_975**2 / 10
    centre = (0.7 + Z_975**2 / 20) / denominator
    half = Z_975 * math.sqrt(0.021 + Z_975**2 / 400) / denominator
    assert (result.low, result.high) == pytest.approx((centre - half, centre + half))
    assert (result.low, result.high) == pytest.approx((0.396774, 0.892210), abs=1e-5)


def test_positions_move_toward_the_statement_and_their_spread_is_compared() -> None:
    members = [
        # Group A: weights 5, 1, 3 -> the statement sits at (2·5 + 6·1 + 4·3) / 9 = 28/9.
        MemberPositions(1, 1, 2, 3, 6), MemberPositions(1, 2, 6, 5, 2), MemberPositions(1, 3, 4, 4, 4),
        # Group B: weights 6, 0 -> the statement sits at 1.
        MemberPositions(2, 4, 1, 2, 7), MemberPositions(2, 5, 7, 6, 1),
    ]
    assert statement_position(members[:3]) == pytest.approx(28 / 9)
    figures = position_figures(members)
    # Movements: A (1 + 1 + 0) / 3 = 2/3; B (-1 + 1) / 2 = 0.
    assert figures.movement_toward_statement.estimate == pytest.approx(1 / 3)
    half = T_975_DF1 * math.sqrt(2 * (1 / 3) ** 2) / math.sqrt(2)
    assert figures.movement_toward_statement.high == pytest.approx(1 / 3 + half)
    # Spread (mean absolute deviation): A 4/3 -> 2/3, B 3 -> 2.
    assert figures.spread_before.estimate == pytest.approx((4 / 3 + 3) / 2)
    assert figures.spread_after.estimate == pytest.approx((2 / 3 + 2) / 2)
    assert figures.spread_change.estimate == pytest.approx((-2 / 3 - 1) / 2)


def test_ai_vs_human_is_a_welch_difference_of_group_means() -> None:
    outcomes = [
        GroupOutcome(1, False, (5, 6, 7)), GroupOutcome(2, False, (4, 4)),  # model: 6, 4
        GroupOutcome(3, True, (3, 5)), GroupOutcome(4, True, (2, 4, 3)), GroupOutcome(5, True, (5,)),  # human: 4, 3, 5
    ]
    result = ai_vs_human_agreement(outcomes)
    assert result.estimate == pytest.approx(1.0)
    # Variances of the means: 2/2 = 1 and 1/3; df = (4/3)² / (1² / 1 + (1/3)² / 2) = 1.68421.
    df = (4 / 3) ** 2 / (1 + (1 / 9) / 2)
    assert df == pytest.approx(1.684211, abs=1e-6)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * math.sqrt(4 / 3)
    assert (result.low, result.high) == pytest.approx((1 - half, 1 + half))


@pytest.mark.django_db
def test_the_figures_are_read_from_a_played_protocol() -> None:
    study = build_protocol_study()
    room, members = study.room, study.members
    data = load_protocol(study.experiment)
    assert data.revision_pairs == [RevisionPair(room.pk, members[0].pk, 3, 6), RevisionPair(room.pk, members[1].pk, 5, 5)]
    assert data.prefers_revision == [True, False]
    assert data.positions == [MemberPositions(room.pk, members[0].pk, 2, 3, 6), MemberPositions(room.pk, members[1].pk, 6, 6, 5)]
    assert data.outcomes == [GroupOutcome(room.pk, False, (6, 5))]
    report = protocol_report(data)
    assert report.revised_minus_first_agreement.estimate == pytest.approx(1.5)  # (3 + 0) / 2, one group
    assert report.share_preferring_revision.estimate == pytest.approx(0.5)
    assert report.ai_minus_human_agreement.estimate is None  # no human-mediated group


@pytest.mark.django_db
def test_protocol_report_prints_the_figures() -> None:
    import json
    from io import StringIO

    from django.core.management import call_command

    build_protocol_study("report-protocol")
    out = StringIO()
    call_command("protocol_report", "--experiment", "report-protocol", stdout=out)
    report = json.loads(out.getvalue())
    assert report["revised_minus_first_agreement"]["estimate"] == pytest.approx(1.5)
    assert report["share_preferring_revision"] == {**report["share_preferring_revision"], "estimate": 0.5, "n": 2}
    # Positions: the statement sits at 2·5/(5+4) + 6·4/(5+4) = 34/9; A moves 2 -> 3 toward it, B stays at 6.
    movement = (abs(2 - 34 / 9) - abs(3 - 34 / 9) + 0) / 2
    assert report["positions"]["movement_toward_statement"]["estimate"] == pytest.approx(movement)

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


# --- On the researcher's analytics page and in its CSV ------------------------------------------------


def _protocol_cells(html: str) -> dict[str, dict[str, str]]:
    import re

    table = html.split('<table class="table protocol">', 1)[1].split("</table>", 1)[0]
    return {
        match["key"]: dict(re.findall(r'data-(value|low|high)="([^"]+)"', match["attrs"]))
        for match in re.finditer(r'<tr data-metric="(?P<key>[a-z_]+)"(?P<attrs>[^>]*)>', table)
    }


@pytest.mark.django_db
def test_the_analytics_page_and_csv_show_the_protocol_figures(client, researcher, outsider_researcher) -> None:
    import csv
    import io

    from accounts.models import Collaboration

    study = build_protocol_study("page-protocol")
    study.experiment.owner = researcher
    study.experiment.save()
    client.force_login(researcher)
    html = client.get("/researcher/experiments/page-protocol/analytics/").content.decode()
    assert "Habermas Machine protocol" in html
    cells = _protocol_cells(html)
    assert float(cells["revised_minus_first_agreement"]["value"]) == pytest.approx(1.5)  # one group: no interval
    assert "low" not in cells["revised_minus_first_agreement"]
    # One of two prefers the revision: Wilson interval 0.5 ± z·sqrt(1/8 + z²/16) / (1 + z²/2).
    half = Z_975 * math.sqrt(1 / 8 + Z_975**2 / 16) / (1 + Z_975**2 / 2)
    share = cells["share_preferring_revision"]
    assert (float(share["value"]), float(share["low"]), float(share["high"])) == pytest.approx((0.5, 0.5 - half, 0.5 + half), abs=1e-4)
    movement = (abs(2 - 34 / 9) - abs(3 - 34 / 9)) / 2
    assert float(cells["position_movement_toward_statement"]["value"]) == pytest.approx(movement, abs=1e-4)
    assert float(cells["position_spread_before"]["value"]) == pytest.approx(2.0)  # |2 − 4| and |6 − 4|
    assert float(cells["position_spread_after"]["value"]) == pytest.approx(1.5)  # |3 − 4.5| and |6 − 4.5|
    assert "value" not in cells["ai_minus_human_agreement"] and "value" not in cells["share_preferring_ai"]  # no human mediator
    rows = list(csv.reader(io.StringIO(client.get("/researcher/experiments/page-protocol/analytics.csv").content.decode())))
    protocol = {row[5]: row for row in rows if row[1] == "protocol"}
    assert set(protocol) == set(cells)
    assert float(protocol["share_preferring_revision"][6]) == pytest.approx(0.5)
    assert float(protocol["share_preferring_revision"][7]) == pytest.approx(0.5 - half, abs=1e-5)
    assert protocol["share_preferring_revision"][9] == "2"
    # The analytics view's rule: another researcher's experiment does not exist; a viewer sees it.
    client.force_login(outsider_researcher)
    assert client.get("/researcher/experiments/page-protocol/analytics/").status_code == 404
    assert client.get("/researcher/experiments/page-protocol/analytics.csv").status_code == 404
    Collaboration.objects.create(experiment=study.experiment, user=outsider_researcher, role=Collaboration.Role.VIEWER)
    assert "Habermas Machine protocol" in client.get("/researcher/experiments/page-protocol/analytics/").content.decode()


@pytest.mark.django_db
def test_the_analytics_page_shows_ai_vs_human_mediator_figures(client, researcher) -> None:
    from deliberation.models import Candidate, PairwisePreference, Round
    from tests.factories import ArmFactory

    study = build_protocol_study("page-mediator")
    study.experiment.owner = researcher
    study.experiment.save()
    ArmFactory(experiment=study.experiment, name="human", human_mediator=True)
    # The critique round's first revision was written by a member; each member chose between it and the model's.
    mediator = study.members[0]
    Candidate.objects.filter(pk=study.revised[0].pk).update(author=mediator)
    Round.objects.filter(pk=study.critique.pk).update(mediator=mediator)
    for member, preferred in zip(study.members, [study.revised[1], study.revised[0]]):
        PairwisePreference.objects.create(
            participant=member, round=study.critique, candidate_a=study.revised[0], candidate_b=study.revised[1], preferred=preferred
        )
    client.force_login(researcher)
    cells = _protocol_cells(client.get("/researcher/experiments/page-mediator/analytics/").content.decode())
    assert float(cells["share_preferring_ai"]["value"]) == pytest.approx(0.5)
    assert "low" in cells["share_preferring_ai"]
    # The only group is human-mediated: no model-mediated group to compare it with yet.
    assert "value" not in cells["ai_minus_human_agreement"]


@pytest.mark.django_db
def test_an_experiment_without_the_protocol_loads_none_of_it(client, researcher, monkeypatch) -> None:
    from research import analytics_protocol
    from tests.factories import ExperimentFactory

    def refuse(experiment: object) -> None:
        raise AssertionError("the protocol's rows were loaded for an experiment without the protocol")

    monkeypatch.setattr(analytics_protocol, "load_protocol", refuse)
    ExperimentFactory(owner=researcher, slug="plain")
    client.force_login(researcher)
    response = client.get("/researcher/experiments/plain/analytics/")
    assert response.status_code == 200 and "Habermas Machine protocol" not in response.content.decode()
    assert not any(row.split(",")[1] == "protocol" for row in client.get("/researcher/experiments/plain/analytics.csv").content.decode().splitlines())

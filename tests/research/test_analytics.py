"""Analytics: each figure against a hand computation, the bootstrap, the page, the CSV and who may see them."""

from __future__ import annotations

import csv
import io
import re
from statistics import mean

import pytest

from research import analytics
from research.analytics import (
    Estimate,
    OpinionEndorsement,
    StatementRating,
    best_opinion_outcome,
    bootstrap_ci,
    exclusion_difference,
    statement_divisiveness,
)
from tests.research.study import build_study, hand_computed_figures

pytestmark = pytest.mark.django_db


def _row(participant: int, candidate: int, agreement: int, *, rank: int | None = 1, room: int = 1) -> StatementRating:
    return StatementRating(room_id=room, candidate_id=candidate, participant_id=participant, agreement=agreement, welfare_rank=rank)


# --- The figures on small, known rows -------------------------------------------------------------------


def test_divisiveness_is_the_mean_absolute_difference_between_raters() -> None:
    assert statement_divisiveness([1, 4, 7]) == pytest.approx((3 + 6 + 3) / 3)
    assert statement_divisiveness([5, 5]) == 0
    assert statement_divisiveness([6]) is None


def test_the_best_opinion_contest_uses_the_same_raters_for_both_sides() -> None:
    # Opinion 10 (by participant 1) is rated 6 and 6 by participants 2 and 3; opinion 20 (by 2) gets 3 and 4.
    opinions = [
        OpinionEndorsement(room_id=1, opinion_id=10, author_id=1, rater_id=2, agreement=6),
        OpinionEndorsement(room_id=1, opinion_id=10, author_id=1, rater_id=3, agreement=6),
        OpinionEndorsement(room_id=1, opinion_id=20, author_id=2, rater_id=1, agreement=3),
        OpinionEndorsement(room_id=1, opinion_id=20, author_id=2, rater_id=3, agreement=4),
    ]
    # The top statement (rank 1) is rated 7 by the author of the best opinion, 5 and 6 by the others:
    # judged by participants 2 and 3 only, 5.5 < 6, a loss.
    top = [_row(1, 100, 7), _row(2, 100, 5), _row(3, 100, 6), _row(2, 200, 7, rank=2)]
    assert best_opinion_outcome(top, opinions) == 0.0
    assert best_opinion_outcome([_row(2, 100, 6), _row(3, 100, 6)], opinions) == 0.5
    assert best_opinion_outcome([_row(2, 100, 7), _row(3, 100, 6)], opinions) == 1.0
    assert best_opinion_outcome(top, []) is None


def test_the_exclusion_difference_compares_the_excluded_member_with_the_included_members_means() -> None:
    rows = [_row(1, 100, 2), _row(1, 200, 4), _row(2, 100, 6), _row(2, 200, 6), _row(3, 100, 5), _row(3, 200, 3)]
    assert exclusion_difference(rows, excluded_id=1) == pytest.approx(3 - (6 + 4) / 2)
    assert exclusion_difference(rows, excluded_id=99) is None


def test_the_bootstrap_is_seeded_and_collapses_on_constant_data() -> None:
    groups = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    first = bootstrap_ci(groups, lambda gs: mean(gs), seed=[5, 1])
    assert first == bootstrap_ci(groups, lambda gs: mean(gs), seed=[5, 1])
    assert first != bootstrap_ci(groups, lambda gs: mean(gs), seed=[6, 1])
    low, high = first
    assert 0 <= low < mean(groups) < high <= 1
    assert bootstrap_ci([0.7] * 5, lambda gs: mean(gs), seed=[1]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert bootstrap_ci([], lambda gs: mean(gs), seed=[1]) == (None, None)


def test_charts_are_inline_svg_with_escaped_labels() -> None:
    chart = analytics.bar_chart(title="T", bars=[analytics.Bar("<script>x</script>", Estimate(0.7, 0.5, 0.9, 3)),
                                                  analytics.Bar("empty", Estimate(None))], low=0, high=1, reference=0.5)
    assert chart.startswith("<svg") and "<script>" not in chart and "&lt;script&gt;" in chart
    assert "no data yet" in chart and 'class="ci"' in chart and 'class="reference"' in chart


# --- A whole study, against a hand computation from the rows ----------------------------------------------------------


@pytest.fixture
def study(researcher):
    return build_study(owner=researcher, slug="analysed")


def _page_values(html: str) -> dict[tuple[str, str], float]:
    cells = re.findall(r'data-metric="([a-z_]+)" data-arm="([^"]+)" data-value="([-0-9.]+)"', html)
    return {(metric, arm): float(value) for metric, arm, value in cells}


def test_the_analytics_page_shows_every_figure_per_arm_as_computed_by_hand(client, study, researcher) -> None:
    client.force_login(researcher)
    html = client.get("/researcher/experiments/analysed/analytics/").content.decode()
    shown = _page_values(html)
    expected_figures = {
        "base": {"mean_agreement", "worst_off_agreement", "divisiveness", "mean_quality", "win_rate_vs_best_opinion", "head_to_head_win_rate", "reward_model_mae"},
        "opponent": {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "head_to_head_win_rate", "reward_model_mae"},
        "exclusion": {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "exclusion_effect", "excluded_mean_agreement", "reward_model_mae"},
    }
    for name, arm in study.arms.items():
        hand = hand_computed_figures(arm)
        assert expected_figures[name] <= set(hand), name
        for metric, value in hand.items():
            assert shown[(metric, name)] == pytest.approx(value, abs=5e-5), (name, metric)
    # Head-to-head is a zero-sum contest between the two arms.
    assert shown[("head_to_head_win_rate", "base")] + shown[("head_to_head_win_rate", "opponent")] == pytest.approx(1)
    assert ("exclusion_effect", "base") not in shown
    assert html.count("<svg") >= 3 and "<script" not in html.split("<body", 1)[1]


def test_every_estimate_has_its_bootstrap_interval_and_the_csv_matches_the_page(client, study, researcher) -> None:
    report = analytics.experiment_report(study.experiment)
    for arm in report.arms:
        for key in analytics.METRIC_BY_KEY:
            estimate: Estimate = arm.estimates[key]
            if estimate.value is not None:
                assert estimate.low is not None and estimate.low - 1e-9 <= estimate.value <= estimate.high + 1e-9, (arm.name, key)
    client.force_login(researcher)
    response = client.get("/researcher/experiments/analysed/analytics.csv")
    assert response["Content-Type"].startswith("text/csv") and "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    by_key = {(row["arm"], row["metric"]): row for row in rows if row["kind"] == "arm"}
    base = next(a for a in report.arms if a.name == "base")
    assert float(by_key[("base", "mean_agreement")]["value"]) == pytest.approx(base.estimates["mean_agreement"].value, rel=1e-5)
    assert float(by_key[("base", "head_to_head_win_rate")]["ci_low"]) == pytest.approx(base.estimates["head_to_head_win_rate"].low, rel=1e-5)
    assert {row["metric"] for row in rows} >= set(analytics.METRIC_BY_KEY) | {"reward_model_spearman", "reward_model_pairwise_accuracy"}
    # Seeded: the same data gives the same intervals.
    assert client.get("/researcher/experiments/analysed/analytics.csv").content == response.content


def test_only_the_owner_or_a_superuser_see_the_analytics(client, study, outsider_researcher) -> None:
    client.force_login(outsider_researcher)
    assert client.get("/researcher/experiments/analysed/analytics/").status_code == 404
    assert client.get("/researcher/experiments/analysed/analytics.csv").status_code == 404
    outsider_researcher.is_staff = True  # staff alone is not enough
    outsider_researcher.save()
    assert client.get("/researcher/experiments/analysed/analytics/").status_code == 404
    outsider_researcher.is_superuser = True
    outsider_researcher.save()
    assert client.get("/researcher/experiments/analysed/analytics/").status_code == 200


def test_an_experiment_without_ratings_shows_no_figures_yet(client, researcher) -> None:
    from tests.factories import ExperimentFactory

    ExperimentFactory(owner=researcher, slug="empty")
    client.force_login(researcher)
    html = client.get("/researcher/experiments/empty/analytics/").content.decode()
    assert _page_values(html) == {} and "no data yet" in html


def test_the_studywide_spearman_is_the_reward_metrics_definition() -> None:
    import random as _random

    from modeling.reward.metrics import mean_within_participant_spearman

    rng = _random.Random(4)
    participants = [p for p in range(60) for _ in range(rng.randint(1, 6))]
    targets = [float(rng.randint(1, 7)) for _ in participants]
    predictions = [4.0 if p % 7 == 0 else round(rng.uniform(1, 7), 1) for p in participants]  # some all-equal predictions
    assert analytics.within_participant_spearman(participants, predictions, targets) == pytest.approx(
        mean_within_participant_spearman(participants, predictions, targets), abs=1e-12
    )
    assert analytics.within_participant_spearman([1, 1], [2.0, 3.0], [5.0, 5.0]) is None


def test_the_studywide_pairwise_accuracy_is_the_reward_metrics_definition() -> None:
    import random as _random

    import pandas as pd

    from modeling.reward.metrics import pairwise_accuracy

    rng = _random.Random(9)
    participants = [p for p in range(40) for _ in range(rng.randint(1, 5))]
    targets = [float(rng.randint(1, 7)) for _ in participants]
    predictions = [float(rng.choice([3.0, 4.0, 4.5, 5.0])) for _ in participants]  # with predicted ties
    frame = pd.DataFrame({"p": participants, "x": predictions, "y": targets, "row": range(len(participants))})
    expected_accuracy, expected_pairs = pairwise_accuracy(participants, predictions, targets)
    accuracy, pairs = analytics.pairwise_agreement_accuracy(frame)
    assert pairs == expected_pairs and accuracy == pytest.approx(expected_accuracy, abs=1e-12)


def test_value_labels_never_sit_on_a_whisker(study) -> None:
    # Inline bars: each value label starts right of its interval's end.
    chart = analytics.bar_chart(title="T", bars=[analytics.Bar("wide", Estimate(2.0, 1.5, 6.5, 3))], low=1, high=7)
    (whisker_end,) = re.findall(r'x2="([0-9.]+)" y2="[0-9.]+" class="ci"', chart)
    (label_x,) = re.findall(r'<text x="([0-9.]+)" y="[0-9.]+" class="value">', chart)
    assert float(label_x) > float(whisker_end)
    # The forest plot: the numbers are in a column outside the axes; every whisker is inside them.
    from research import plots

    analysis = analytics.analyse(study.experiment)
    figure = plots.forest_figure(analysis, title="test")
    axes = figure.axes[0]
    low, high = axes.get_xlim()
    for line in axes.get_lines()[:-1]:  # the last line is the dashed zero
        assert all(low <= x <= high for x in line.get_xdata())
    numbers = [text for text in axes.texts if re.search(r"\d", text.get_text())]
    assert len(numbers) == len(analysis.comparisons) + 1 and all(text.get_position()[0] > 1 for text in numbers)  # + the header
    for fmt, magic in (("svg", b"<svg"), ("png", b"\x89PNG")):
        assert magic in plots.render(analysis, plot="forest", fmt=fmt, title="t")[:400]

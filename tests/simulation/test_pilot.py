"""A pilot through every protocol, and its analytics against a hand computation from the raw rows.

simulate_cohort drives bots through the real site (daphne in a subprocess, on the test database): two
arms, head-to-head (the ranked arm against the no-reward-model baseline), opinion ratings and attention
checks on, one bot in four answering the attention item wrongly. Mediation uses the stand-in generator
(the arms name it, so the site process uses it too) and the real similarity reward model.

The analytics are then recomputed here by hand from the Rating, Candidate and AttentionCheck rows, with
a small independent implementation of the documented bootstrap (docs/analytics.md).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from io import StringIO
from statistics import mean

import numpy as np
import pytest
from django.core.management import call_command

from deliberation import services
from deliberation.models import AttentionCheck, Candidate, OpinionRating, PairwisePreference, Participant, Rating, Round
from research import analytics
from simulation.management.commands.simulate_cohort import group_problems
from tests.factories import ArmFactory, ExperimentFactory
from tests.research.study import finish_rating, mediate_with, shown_to, write_opinions

GROUPS = 4


def _pilot_experiment():
    experiment = ExperimentFactory(slug="pilot-all", group_size=3, rate_opinions=True, attention_check=True, assignment_seed=2024)
    experiment.arms.all().delete()
    baseline = ArmFactory(experiment=experiment, name="baseline", generator_backend="stand-in", reward_model="none", k_shown=2)
    ranked = ArmFactory(
        experiment=experiment, name="ranked", generator_backend="stand-in", reward_model="similarity", welfare_method="rawlsian",
        k_shown=4, compare_with=baseline,
    )
    return experiment, ranked, baseline


def _bootstrap_by_hand(per_room: dict[int, dict[int, tuple[float, float]]], stratum_of: dict[int, int], arm_a: int, arm_b: int, seed: list[int]) -> tuple[float, float]:
    """The documented stratified cluster bootstrap, written plainly: in blocks of 250 resamples, for each stratum
    (the arm a group was assigned to, in id order), one block x n matrix of draws of the stratum's n groups (in
    id order) with replacement; each row is one resample."""
    rng = np.random.default_rng(seed)
    strata = sorted(set(stratum_of.values()))
    rooms_of = {s: sorted(r for r in per_room if stratum_of[r] == s) for s in strata}
    differences = []
    for first in range(0, analytics.BOOTSTRAP_RESAMPLES, 250):
        block = min(250, analytics.BOOTSTRAP_RESAMPLES - first)
        picks = {s: rng.integers(0, len(rooms_of[s]), size=(block, len(rooms_of[s]))) for s in strata}
        for row in range(block):
            sums = {arm_a: [0.0, 0.0], arm_b: [0.0, 0.0]}
            for s in strata:
                for pick in picks[s][row]:
                    for arm, (total, count) in per_room[rooms_of[s][pick]].items():
                        if arm in sums:
                            sums[arm][0] += total
                            sums[arm][1] += count
            if sums[arm_a][1] and sums[arm_b][1]:
                differences.append(sums[arm_a][0] / sums[arm_a][1] - sums[arm_b][0] / sums[arm_b][1])
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.django_db(transaction=True)
def test_a_pilot_runs_every_protocol_and_its_analytics_match_a_hand_computation(client) -> None:
    experiment, ranked, baseline = _pilot_experiment()
    out = StringIO()
    call_command(
        "simulate_cohort", "--experiment", "pilot-all", "--groups", str(GROUPS), "--seed", "3", "--timeout", "180",
        "--opinions", "template", "--inattentive-share", "0.25", "--as-user", experiment.owner.username, stdout=out,
    )
    summary = json.loads(out.getvalue())
    assert summary["groups_as_designed"] == GROUPS and summary["problems"] == {} and summary["failures"] == []

    # Every protocol step was answered, by every bot, through the site.
    members = list(Participant.objects.filter(room__experiment=experiment))
    assert len(members) == 3 * GROUPS and all(m.finished_at for m in members)
    assert all(m.simulated_persona and m.simulated_persona["kind"] == "bot" for m in members)
    assert AttentionCheck.objects.filter(round__room__experiment=experiment).count() == len(members)
    inattentive = {m.pk for m in members if not m.simulated_persona["attentive"]}
    assert {a.participant_id for a in AttentionCheck.objects.filter(passed=False)} == inattentive
    assert OpinionRating.objects.filter(opinion__round__room__experiment=experiment).count() == len(members) * 2
    head_to_head_rooms = {m.room_id for m in members if m.room.arm_id == ranked.pk}
    assert head_to_head_rooms and PairwisePreference.objects.filter(round__room_id__in=head_to_head_rooms).count() == 3 * len(head_to_head_rooms) * 2 * 2
    assert summary["counts"]["pairwise_preferences"] == PairwisePreference.objects.count()

    # --- The hand computation, from the raw rows ---
    ratings = list(Rating.objects.filter(candidate__round__room__experiment=experiment).select_related("candidate__round__room"))
    chosen = [r for r in ratings if r.candidate.rank == 1]
    by_arm_chosen: dict[int, list[int]] = defaultdict(list)
    for r in chosen:
        by_arm_chosen[r.candidate.source_arm_id].append(r.agreement)
    by_arm_all: dict[int, list[int]] = defaultdict(list)
    for r in ratings:
        by_arm_all[r.candidate.source_arm_id].append(r.agreement)
    statements: dict[int, list[int]] = defaultdict(list)
    for r in ratings:
        statements[r.candidate_id].append(r.agreement)
    arm_of = {r.candidate_id: r.candidate.source_arm_id for r in ratings}
    worst_off = {arm: mean(min(v) for c, v in statements.items() if arm_of[c] == arm) for arm in (ranked.pk, baseline.pk)}

    report = analytics.experiment_report(experiment, ("failed_attention",))
    every = report.without_exclusions
    assert every is not None
    arms = {a.name: a for a in every.arms}
    for arm in (ranked, baseline):
        figures = arms[arm.name].estimates
        assert figures["chosen_mean_agreement"].value == pytest.approx(mean(by_arm_chosen[arm.pk]), abs=1e-12)
        assert figures["mean_agreement"].value == pytest.approx(mean(by_arm_all[arm.pk]), abs=1e-12)
        assert figures["worst_off_agreement"].value == pytest.approx(worst_off[arm.pk], abs=1e-12)
    # Reward-model accuracy only where a reward model ranked: the baseline's constant has none.
    assert arms["baseline"].reward_model is None and arms["ranked"].reward_model is not None
    assert arms["ranked"].reward_model.rows == len(by_arm_all[ranked.pk])

    # One arm difference, ranked - baseline on the chosen statement: the point exactly, the interval by hand.
    (comparison,) = [c for c in every.comparisons if c.metric == "chosen_mean_agreement"]
    assert (comparison.arm_a, comparison.arm_b) == ("baseline", "ranked")  # arms in id order: a is the older arm
    difference = mean(by_arm_chosen[baseline.pk]) - mean(by_arm_chosen[ranked.pk])
    assert comparison.difference.value == pytest.approx(difference, abs=1e-12)
    per_room: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
    for r in chosen:
        total, count = per_room[r.candidate.round.room_id].get(r.candidate.source_arm_id, (0.0, 0.0))
        per_room[r.candidate.round.room_id][r.candidate.source_arm_id] = (total + r.agreement, count + 1)
    stratum_of = {room_id: Round.objects.get(room_id=room_id).room.arm_id for room_id in per_room}
    low, high = _bootstrap_by_hand(per_room, stratum_of, baseline.pk, ranked.pk, [experiment.assignment_seed, 1])
    assert (comparison.difference.low, comparison.difference.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert low <= difference <= high
    assert 0 < comparison.p_value <= 1 and comparison.p_holm >= comparison.p_value
    assert all(c.p_holm is not None and c.p_holm >= c.p_value for c in every.comparisons)

    # The exclusion rule drops exactly the inattentive bots' ratings.
    kept = [r.agreement for r in ratings if r.participant_id not in inattentive and r.candidate.source_arm_id == baseline.pk]
    with_rule = {a.name: a for a in report.analysis.arms}
    assert with_rule["baseline"].estimates["mean_agreement"].value == pytest.approx(mean(kept), abs=1e-12)
    assert report.analysis.exclusions[0].participants == len(inattentive)

    # The page and the CSV say which rules were applied.
    client.force_login(experiment.owner)
    page = client.get("/researcher/experiments/pilot-all/analytics/?exclude=failed_attention").content.decode()
    assert 'data-rules="failed_attention"' in page and 'data-rules="none"' in page
    csv_text = client.get("/researcher/experiments/pilot-all/analytics.csv?exclude=failed_attention").content.decode()
    assert "failed_attention,difference" in csv_text and "none,difference" in csv_text
    for fmt, magic in (("svg", b"<svg"), ("png", b"\x89PNG")):
        figure = client.get(f"/researcher/experiments/pilot-all/analytics/forest.{fmt}")
        assert figure.status_code == 200 and magic in figure.content[:400]


def test_a_group_that_did_not_finish_as_designed_is_reported(experiment, django_capture_on_commit_callbacks) -> None:
    """The issue's pilot: one member never finishes rating, the deadline ends the round `completed` and records
    the dropout. The cohort command's check names it (and the command exits non-zero on any such problem)."""
    from django.utils import timezone

    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    arm = experiment.arms.get()
    mediate_with(round_, {arm.pk: [[5.0, 3.0, 4.0, 1.0], [2.0, 6.0, 3.0, 1.0], [4.0, 4.5, 2.0, 3.0]]})
    for member in members[:2]:
        finish_rating(member, {c: 5 for c in shown_to(member)})
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now())
    services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.RATING)
    round_.refresh_from_db()
    assert round_.outcome == Round.Outcome.COMPLETED  # the old summary counted this group as completed
    problems = group_problems(members[0].room, 3)
    assert any("dropped out" in p for p in problems), problems
    assert group_problems(members[0].room, 4)[0] == "3 of 4 bots joined"


def test_chosen_statement_is_the_arm_rank_one(experiment) -> None:
    """The 'chosen' statement of the analytics is the candidate the arm's welfare function ranked first."""
    members = [services.participant_join(experiment=experiment) for _ in range(3)]
    round_ = write_opinions(members)
    arm = experiment.arms.get()
    mediate_with(round_, {arm.pk: [[5.0, 3.0, 4.0, 1.0], [2.0, 6.0, 3.0, 1.0], [4.0, 4.5, 2.0, 3.0]]})
    top = Candidate.objects.get(round=round_, rank=1)
    for i, member in enumerate(members):
        finish_rating(member, {c: (7 - i if c == top.pk else 2) for c in shown_to(member)})
    figures = analytics.experiment_report(experiment).arms[0].estimates
    assert figures["chosen_mean_agreement"].value == pytest.approx(6.0)
    assert figures["chosen_worst_off_agreement"].value == pytest.approx(5.0)
    assert math.isclose(figures["mean_agreement"].value, (7 + 6 + 5 + 2 * 3) / 6)

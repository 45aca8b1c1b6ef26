"""Bots: the simulated judgement, and a pilot cohort through the real site."""

from __future__ import annotations

import json
import random
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from deliberation.models import Participant, Rating, Round
from simulation import bots
from tests.factories import ExperimentFactory, UserFactory

AFFIRMING = "We should raise taxes on the rich."
NEGATING = "We should not raise taxes on the rich."


def test_personas_alternate_stances_so_every_group_disagrees() -> None:
    personas = bots.make_personas(random.Random(3), 5)
    assert [p.stance for p in personas][:2] in ([1, -1], [-1, 1])
    assert sum(p.stance for p in personas) in (1, -1)
    assert all(0.4 <= p.strength <= 1.0 for p in personas)


def test_a_bot_agrees_more_with_its_own_side_than_the_other() -> None:
    supporter = bots.Persona(stance=1, strength=1.0)
    own = "Taxes on the rich should go up to fund hospitals."
    rng = random.Random(0)
    for_it = [bots.simulated_agreement(statement=AFFIRMING + " It funds hospitals.", own_opinion=own, persona=supporter, affirming=AFFIRMING, negating=NEGATING, rng=rng) for _ in range(50)]
    against = [bots.simulated_agreement(statement="No, we should not: not the rich, not now.", own_opinion=own, persona=supporter, affirming=AFFIRMING, negating=NEGATING, rng=rng) for _ in range(50)]
    assert sum(for_it) / 50 > sum(against) / 50 + 1
    assert all(1 <= value <= 7 for value in for_it + against)


def test_quality_prefers_a_readable_length() -> None:
    rng = random.Random(1)
    good = [bots.simulated_quality(statement=" ".join(["word"] * 30), rng=rng) for _ in range(50)]
    terse = [bots.simulated_quality(statement="Yes.", rng=rng) for _ in range(50)]
    assert sum(good) / 50 > sum(terse) / 50 + 1.5


@pytest.mark.django_db
def test_simulate_cohort_refuses_an_unknown_experiment() -> None:
    user = UserFactory(is_superuser=True)
    with pytest.raises(CommandError, match="No experiment"):
        call_command("simulate_cohort", "--experiment", "nope", "--as-user", user.username)


@pytest.mark.real_model
@pytest.mark.django_db(transaction=True)
def test_a_pilot_cohort_runs_through_the_real_site() -> None:
    experiment = ExperimentFactory(slug="pilot", group_size=3)
    out = StringIO()
    call_command("simulate_cohort", "--experiment", "pilot", "--groups", "1", "--group-size", "3", "--seed", "5", "--timeout", "300", "--as-user", experiment.owner.username, stdout=out)
    summary = json.loads(out.getvalue())
    assert summary["groups_completed"] == 1 and summary["failures"] == []
    arm = experiment.arms.get()
    assert summary["counts"]["participants"] == 3 and summary["counts"]["opinions"] == 3
    assert summary["counts"]["candidates"] == arm.n_candidates
    assert summary["counts"]["ratings"] == 3 * arm.k_shown and summary["counts"]["rankings"] == 3
    round_ = Round.objects.get(room__experiment=experiment)
    winner_scores = list(Rating.objects.filter(candidate__round=round_, candidate__rank=1).values_list("agreement", flat=True))
    assert summary["agreement_by_arm"][arm.name]["worst_off"] == min(winner_scores)
    assert set(Participant.objects.filter(room__experiment=experiment).values_list("external_id", flat=True)) == {
        "bot-5-0-0", "bot-5-0-1", "bot-5-0-2"
    }
    assert summary["seconds_per_round"] > 0


@pytest.mark.real_model  # the bots' opinions are written by the real generator, in this process
@pytest.mark.django_db(transaction=True)
def test_a_pilot_cohort_plays_the_two_round_protocol_with_positions_and_a_human_mediator_arm() -> None:
    """simulate_cohort through the real site: a model arm (the stand-in generator mediates, so the server loads no
    generator) and a human mediator arm, each group playing an opinion round and a critique round, with positions."""
    from deliberation.models import Candidate, FinalPreference, Position
    from tests.factories import ArmFactory

    experiment = ExperimentFactory(slug="protocol-pilot", group_size=3, critique_rounds=1, ask_positions=True)
    experiment.arms.all().delete()
    ArmFactory(experiment=experiment, name="model", generator_backend="stand-in")
    ArmFactory(experiment=experiment, name="human", human_mediator=True)
    out = StringIO()
    call_command(
        "simulate_cohort", "--experiment", "protocol-pilot", "--groups", "2", "--group-size", "3", "--seed", "7", "--timeout", "300",
        "--as-user", experiment.owner.username, stdout=out,
    )
    summary = json.loads(out.getvalue())
    assert summary["failures"] == [] and summary["groups_completed"] == 2
    assert summary["groups_as_designed"] == 2 and summary["problems"] == {}
    counts = summary["counts"]
    assert counts["critique_rounds"] == 2
    # Model group: 3 critiques; human group: 2 (its mediator writes the statement instead).
    assert counts["critiques"] == 5 and counts["human_statements"] == 2
    assert counts["positions"] == 2 * 5 and counts["final_preferences"] == 5
    human = Candidate.objects.filter(round__room__experiment=experiment, author__isnull=False)
    assert {c.round.index for c in human} == {0, 1} and all(c.text.startswith("We have heard") for c in human)
    assert Position.objects.filter(participant__room__experiment=experiment, stage="after").count() == 5
    assert FinalPreference.objects.filter(participant__room__experiment=experiment).count() == 5
    assert Participant.objects.filter(room__experiment=experiment, finished_at__isnull=False).count() == 5

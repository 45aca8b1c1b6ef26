"""Seats: knowing someone's external id does not hand over their seat, and one browser holds one seat per
experiment unless the experiment allows several (the demo)."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from deliberation.models import Experiment, Participant
from deliberation.views import SESSION_KEY

pytestmark = pytest.mark.django_db


def _join(client: Client, slug: str, query: str = ""):
    return client.post(reverse("join", args=[slug]) + query, {"consent": "yes"})


def test_an_external_id_from_another_browser_does_not_take_the_seat(experiment: Experiment) -> None:
    owner, attacker = Client(), Client()
    first = _join(owner, experiment.slug, "?participant_label=p1")
    assert first.status_code == 302
    stolen = _join(attacker, experiment.slug, "?participant_label=p1")
    assert stolen.status_code == 403 and "another browser" in stolen.content.decode()
    code = first["Location"].strip("/").rsplit("/", 1)[-1]
    assert code not in attacker.session.get(SESSION_KEY, [])
    assert attacker.get(first["Location"]).status_code == 404
    # The original browser resumes its own seat.
    again = _join(owner, experiment.slug, "?participant_label=p1")
    assert again.status_code == 302 and again["Location"] == first["Location"]
    assert Participant.objects.filter(external_id="p1").count() == 1


def test_one_browser_holds_one_seat_per_experiment(experiment: Experiment) -> None:
    browser = Client()
    locations = {_join(browser, experiment.slug, f"?participant_label=sock-{i}")["Location"] for i in range(3)}
    assert len(locations) == 1
    assert Participant.objects.filter(room__experiment=experiment).count() == 1


def test_an_experiment_may_allow_several_seats_per_browser(experiment: Experiment) -> None:
    Experiment.objects.filter(pk=experiment.pk).update(allow_several_seats_per_browser=True)
    browser = Client()
    locations = {_join(browser, experiment.slug)["Location"] for _ in range(3)}
    assert len(locations) == 3


def test_the_demo_allows_several_windows_of_one_browser() -> None:
    call_command("seed_demo")
    assert Experiment.objects.get(slug="demo").allow_several_seats_per_browser
    assert Experiment._meta.get_field("allow_several_seats_per_browser").default is False

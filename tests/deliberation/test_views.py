"""HTTP views: joining, authorisation, errors a participant can read, escaping, CSRF."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from deliberation import services
from deliberation.models import Candidate, Experiment, Opinion, Participant, Presentation, Round
from deliberation.views import SESSION_KEY
from tests.conftest import OPINIONS

pytestmark = pytest.mark.django_db

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_the_invite_link_shows_consent_then_joins_and_keeps_the_prolific_id(experiment: Experiment) -> None:
    client = Client()
    page = client.get(reverse("join", args=[experiment.slug]) + "?PROLIFIC_PID=abc123")
    assert page.status_code == 200
    assert b"I have read this and agree" in page.content
    assert b'value="abc123"' in page.content
    response = client.post(reverse("join", args=[experiment.slug]), {"consent": "yes", "participant_label": "abc123"})
    participant = Participant.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("participant", args=[participant.code])
    assert participant.external_id == "abc123" and participant.consented_at is not None
    room = client.get(response["Location"])
    assert room.status_code == 200
    assert b"Waiting for the group" in room.content


def test_joining_without_consent_is_refused_with_a_readable_message(experiment: Experiment) -> None:
    response = Client().post(reverse("join", args=[experiment.slug]), {})
    assert response.status_code == 400
    assert b"tick the box" in response.content
    assert not Participant.objects.exists()


def test_joining_a_full_room_by_its_link_is_refused_with_a_clear_message(group) -> None:
    room = group[0].participant.room
    response = Client().post(reverse("join_room", args=[room.experiment.slug, room.code]), {"consent": "yes"})
    assert response.status_code == 403
    assert b"closed" in response.content or b"full" in response.content


def test_joining_a_closed_study_is_refused(experiment: Experiment) -> None:
    experiment.status = Experiment.Status.CLOSED
    experiment.save()
    response = Client().post(reverse("join", args=[experiment.slug]), {"consent": "yes"})
    assert response.status_code == 403
    assert b"not accepting participants" in response.content


def test_a_participant_page_belongs_to_the_browser_that_joined(participant, outsider) -> None:
    url = reverse("participant", args=[participant.participant.code])
    assert participant.client.get(url).status_code == 200
    assert outsider.client.get(url).status_code == 404
    assert Client().get(url).status_code == 404


def test_a_participant_cannot_act_in_another_room(participant, outsider) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    response = outsider.client.post(url, {"text": OPINIONS[0]})
    assert response.status_code == 404
    assert not Opinion.objects.exists()


def test_an_empty_opinion_shows_an_inline_error_and_keeps_the_text(participant) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    response = participant.client.post(url, {"text": "too short"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    content = response.content.decode()
    assert "at least 10 characters" in content
    assert "too short" in content  # what they wrote is still in the box
    assert not Opinion.objects.exists()


def test_an_oversized_opinion_is_refused_without_htmx_too(participant) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    response = participant.client.post(url, {"text": "y" * 1500})
    assert response.status_code == 422
    assert "under 1000 characters" in response.content.decode()


def test_html_in_an_opinion_is_shown_escaped(participant) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    participant.client.post(url, {"text": "My view: " + XSS})
    page = participant.client.get(reverse("participant", args=[participant.participant.code])).content.decode()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert" in page


def test_html_in_model_output_is_shown_escaped(group) -> None:
    for persona, text in zip(group, OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.get(room=group[0].participant.room)
    # Stand in for a model that echoed markup: the page must still escape it.
    candidate = Candidate.objects.create(round=round_, index=0, text=XSS, backend="t", model_id="m", seed=1, prompt="p", shown=True, rank=1)
    Presentation.objects.create(participant=group[0].participant, candidate=candidate, position=0)
    Round.objects.filter(pk=round_.pk).update(phase=Round.Phase.RATING)
    page = group[0].client.get(reverse("participant", args=[group[0].participant.code])).content.decode()
    assert "<script>alert" not in page and "&lt;script&gt;" in page


def test_a_post_without_a_csrf_token_is_refused(participant) -> None:
    client = Client(enforce_csrf_checks=True)
    session = client.session
    session[SESSION_KEY] = [participant.participant.code]
    session.save()
    response = client.post(reverse("opinion_submit", args=[participant.participant.code]), {"text": OPINIONS[0]})
    assert response.status_code == 403
    assert not Opinion.objects.exists()


def test_a_double_submitted_opinion_is_stored_once(participant) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    participant.client.post(url, {"text": OPINIONS[0]})
    participant.client.post(url, {"text": OPINIONS[0]})
    assert Opinion.objects.filter(participant=participant.participant).count() == 1


def test_a_draft_survives_a_reload(participant) -> None:
    code = participant.participant.code
    assert participant.client.post(reverse("opinion_draft", args=[code]), {"text": "I was typing this"}).status_code == 204
    page = participant.client.get(reverse("participant", args=[code])).content.decode()
    assert "I was typing this" in page


def test_the_monitor_is_for_the_experiment_owner(group, researcher, outsider_researcher) -> None:
    room = group[0].participant.room
    url = reverse("room_monitor", args=[room.pk])
    assert Client().get(url).status_code == 302  # to the login page
    outsider = Client()
    outsider.force_login(outsider_researcher)
    assert outsider.get(url).status_code == 404  # as a missing room: the docs promise 404 for both
    owner = Client()
    owner.force_login(researcher)
    page = owner.get(url)
    assert page.status_code == 200
    assert b"Participant A" in page.content and b"pid-0" in page.content


def test_a_researcher_starts_a_round_before_the_group_is_full(experiment: Experiment, researcher) -> None:
    first = services.participant_join(experiment=experiment)
    services.participant_join(experiment=experiment)
    owner = Client()
    owner.force_login(researcher)
    response = owner.post(reverse("room_start", args=[first.room_id]))
    assert response.status_code == 302
    assert Round.objects.get(room=first.room).phase == Round.Phase.OPINIONS


def test_researchers_see_only_their_own_experiments(experiment: Experiment, outsider_researcher) -> None:
    client = Client()
    client.force_login(outsider_researcher)
    assert experiment.name.encode() not in client.get(reverse("researcher_home")).content
    assert client.get(reverse("experiment_detail", args=[experiment.slug])).status_code == 404


def test_security_headers_are_set(experiment: Experiment) -> None:
    response = Client().get(reverse("join", args=[experiment.slug]))
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_seed_demo_is_idempotent() -> None:
    from django.core.management import call_command

    call_command("seed_demo")
    call_command("seed_demo")
    demo = Experiment.objects.get(slug="demo")
    assert demo.arms.count() == 1 and demo.questions.count() == 5
    client = Client()
    # Logins are throttled (django-axes), which needs the request: log in through the form, as a browser does.
    assert client.post("/accounts/login/", {"username": "researcher", "password": "concord-demo"}).status_code == 302

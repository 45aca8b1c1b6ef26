"""Minor findings of the security review (issue 12): the session key rotates on joining, and GET pages answer HEAD."""

from __future__ import annotations

import pytest
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client
from django.urls import reverse

from deliberation.models import PageView, Participant
from deliberation.views import SESSION_KEY

pytestmark = pytest.mark.django_db


def test_joining_rotates_the_session_key_and_the_seat_moves_with_it(experiment) -> None:
    """A session key planted in the browser before it joined (session fixation) does not become the seat's proof."""
    browser = Client()
    planted = browser.session
    planted["planted"] = True
    planted.save()
    planted_key = planted.session_key
    response = browser.post(reverse("join", args=[experiment.slug]), {"consent": "yes"})
    assert response.status_code == 302
    new_key = browser.cookies["sessionid"].value
    assert new_key != planted_key
    assert not SessionStore(session_key=planted_key).exists(planted_key)
    participant = Participant.objects.get()
    assert browser.session[SESSION_KEY] == [participant.code]
    # The seat proof works with the new key: the page, and rejoining (which gives the same seat).
    assert browser.get(response["Location"]).status_code == 200
    again = browser.post(reverse("join", args=[experiment.slug]), {"consent": "yes"})
    assert again["Location"] == response["Location"]
    # Whoever kept the old key holds nothing.
    fixated = Client()
    fixated.cookies["sessionid"] = planted_key
    assert fixated.get(response["Location"]).status_code == 404


def test_get_pages_answer_head(participant, researcher, experiment) -> None:
    assert Client().head(reverse("home")).status_code == 200
    assert Client().head(reverse("join", args=[experiment.slug])).status_code == 200
    views_before = PageView.objects.count()
    assert participant.client.head(reverse("participant", args=[participant.participant.code])).status_code == 200
    assert PageView.objects.count() == views_before  # a HEAD shows nobody a screen
    staff = Client()
    staff.force_login(researcher)
    for url in (reverse("researcher_home"), reverse("experiment_detail", args=[experiment.slug]), reverse("cohort_monitor", args=[experiment.slug])):
        assert staff.head(url).status_code == 200, url
    # POST-only actions still refuse HEAD.
    assert participant.client.head(reverse("opinion_submit", args=[participant.participant.code])).status_code == 405

"""Login throttling (django-axes, config/settings.py AXES_*): guessing passwords, then the right one, is refused for a while,
on the site's login and the admin's."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.test import Client

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "pw-for-tests"  # tests.factories.UserFactory


@pytest.mark.parametrize("login_url", ["/accounts/login/", "/admin/login/"])
def test_thirty_wrong_passwords_then_the_right_one_is_refused(login_url: str) -> None:
    UserFactory(username="victim", is_staff=True)
    attacker = Client()
    for attempt in range(30):
        attacker.post(login_url, {"username": "victim", "password": f"guess-{attempt}"})
    response = attacker.post(login_url, {"username": "victim", "password": PASSWORD})
    assert response.status_code == 429
    assert "_auth_user_id" not in attacker.session
    # From another address, the username stays locked too (a guesser rotating addresses gains nothing).
    elsewhere = Client(REMOTE_ADDR="198.51.100.7")
    assert elsewhere.post(login_url, {"username": "victim", "password": PASSWORD}).status_code == 429
    assert "_auth_user_id" not in elsewhere.session


def test_the_lock_lifts_after_the_cool_off(settings) -> None:
    UserFactory(username="forgetful")
    client = Client()
    for attempt in range(settings.AXES_FAILURE_LIMIT):
        client.post("/accounts/login/", {"username": "forgetful", "password": f"guess-{attempt}"})
    assert client.post("/accounts/login/", {"username": "forgetful", "password": PASSWORD}).status_code == 429
    past = settings.AXES_COOLOFF_TIME + timedelta(minutes=1)
    for attempt in AccessAttempt.objects.all():
        AccessAttempt.objects.filter(pk=attempt.pk).update(attempt_time=attempt.attempt_time - past)
    assert client.post("/accounts/login/", {"username": "forgetful", "password": PASSWORD}).status_code == 302
    assert "_auth_user_id" in client.session


def test_a_few_typos_do_not_lock_a_researcher_out(settings) -> None:
    UserFactory(username="typist")
    client = Client()
    for attempt in range(settings.AXES_FAILURE_LIMIT - 1):
        client.post("/accounts/login/", {"username": "typist", "password": f"typo-{attempt}"})
    assert client.post("/accounts/login/", {"username": "typist", "password": PASSWORD}).status_code == 302


def test_a_request_without_a_usable_address_still_logs_in_and_is_throttled(settings) -> None:
    """A unix socket gives no REMOTE_ADDR, and a malformed forwarded header no address: PostgreSQL's inet column
    must not see "unknown" (it was a 500 there)."""
    from deliberation.ratelimit import client_ip_address

    settings.TRUSTED_PROXY_COUNT = 1
    UserFactory(username="socket-user")
    client = Client(REMOTE_ADDR="", HTTP_X_FORWARDED_FOR="not-an-address")
    assert client.post("/accounts/login/", {"username": "socket-user", "password": PASSWORD}).status_code == 302
    for attempt in range(30):
        client.post("/accounts/login/", {"username": "socket-user", "password": f"guess-{attempt}"})
    assert client.post("/accounts/login/", {"username": "socket-user", "password": PASSWORD}).status_code == 429
    request = type("R", (), {"META": {"REMOTE_ADDR": "unknown"}})()
    assert client_ip_address(request) is None  # type: ignore[arg-type]

"""Abuse and bad input: floods, oversized bodies, CSP, deployment checks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.test import Client
from django.urls import reverse

from deliberation import ratelimit
from deliberation.models import Opinion, Participant
from tests.conftest import OPINIONS

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def _fresh_ip() -> str:
    # A fresh address per test, so counters of other tests never interfere.
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"


@pytest.fixture(autouse=True)
def one_rate_limit_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits count per fixed 60 s window: a flood that straddled a window boundary would be
    counted in two windows (seen in CI: five requests from 05:07:59.98 to 05:08:00.06)."""
    frozen = 1_800_000_030.0  # the middle of a window
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: frozen))


def test_a_join_flood_from_one_address_is_throttled(experiment, settings) -> None:
    settings.RATE_LIMIT_JOIN_PER_IP = 5
    ip = _fresh_ip()
    client = Client(REMOTE_ADDR=ip)
    statuses = []
    for _ in range(8):
        client.cookies.clear()  # a fresh session each time: one browser holds one seat (test_seats.py)
        statuses.append(client.post(reverse("join", args=[experiment.slug]), {"consent": "yes"}).status_code)
    assert statuses[:5] == [302] * 5
    assert statuses[5:] == [429] * 3
    assert Participant.objects.count() == 5
    # Someone else is not affected.
    assert Client(REMOTE_ADDR=_fresh_ip()).post(reverse("join", args=[experiment.slug]), {"consent": "yes"}).status_code == 302


def test_a_submit_flood_is_throttled_per_participant(participant, settings) -> None:
    settings.RATE_LIMIT_SUBMIT_PER_PARTICIPANT = 3
    url = reverse("opinion_submit", args=[participant.participant.code])
    statuses = [participant.client.post(url, {"text": "bad"}).status_code for _ in range(5)]
    assert statuses == [422, 422, 422, 429, 429]
    assert "Too many requests" in participant.client.post(url, {"text": OPINIONS[0]}).content.decode()
    assert not Opinion.objects.exists()


def test_an_oversized_request_body_is_refused(participant) -> None:
    url = reverse("opinion_submit", args=[participant.participant.code])
    response = participant.client.post(url, {"text": "x" * 300_000})
    assert response.status_code == 400
    assert not Opinion.objects.exists()


def test_pages_carry_a_content_security_policy_that_allows_only_own_scripts(participant) -> None:
    response = participant.client.get(reverse("participant", args=[participant.participant.code]))
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    html = response.content.decode()
    # htmx works under it: no inline scripts or inline event handlers in our pages.
    assert "<script>" not in html and " onclick=" not in html and " style=" not in html
    assert '"includeIndicatorStyles": false' in html


def test_check_deploy_is_clean_under_production_settings() -> None:
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": "a-long-random-production-secret-" + "x" * 40,
        "HTTPS": "1",
        "ALLOWED_HOSTS": "concord.example.org",
        "CSRF_TRUSTED_ORIGINS": "https://concord.example.org",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout

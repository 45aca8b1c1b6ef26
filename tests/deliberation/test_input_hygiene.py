"""Input hygiene at the boundary (deliberation.inputs): NUL and bidirectional controls never reach the
database, invisible characters are not an opinion, and ids out of range are a 404. Run it on PostgreSQL
too (DATABASE_URL), where NUL in text used to be a 500."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from deliberation.inputs import clean_text, visible_length
from deliberation.models import Opinion, Participant
from tests.conftest import OPINIONS

pytestmark = pytest.mark.django_db

NUL, RLO, PDF, LRI = "\x00", "\u202e", "\u202c", "\u2066"


def test_twelve_zero_width_spaces_are_not_an_opinion(participant) -> None:
    code = participant.participant.code
    for invisible in ("\u200b" * 12, "\u200b\u200c\u200d\ufeff" * 5 + "   ", NUL * 30, RLO * 20):
        response = participant.client.post(reverse("opinion_submit", args=[code]), {"text": invisible})
        assert response.status_code == 422 and "at least" in response.content.decode()
    assert not Opinion.objects.exists()
    assert visible_length("\u200b" * 12) == 0 and visible_length("a\u200bb") == 2


def test_nul_and_bidi_controls_are_removed_from_opinions_and_drafts(participant) -> None:
    code = participant.participant.code
    draft = f"half{NUL} a {RLO}thought{PDF}"
    assert participant.client.post(reverse("opinion_draft", args=[code]), {"text": draft}).status_code == 204
    assert Participant.objects.get(pk=participant.participant.pk).opinion_draft == "half a thought"
    text = f"{LRI}{OPINIONS[0]}{NUL}{RLO}"
    assert participant.client.post(reverse("opinion_submit", args=[code]), {"text": text}).status_code == 302
    assert Opinion.objects.get().text == OPINIONS[0]


def test_nul_and_bidi_controls_are_removed_from_external_ids(experiment) -> None:
    client = Client()
    response = client.post(reverse("join", args=[experiment.slug]) + f"?PROLIFIC_PID=pid{NUL}-7{RLO}", {"consent": "yes"})
    assert response.status_code == 302
    assert Participant.objects.get(room__experiment=experiment).external_id == "pid-7"


def test_clean_text_keeps_line_breaks_tabs_and_joined_emoji() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert clean_text(f"one\ntwo\tthree\r\n{family}") == f"one\ntwo\tthree\r\n{family}"


def test_ids_out_of_range_are_404_not_500(participant, researcher) -> None:
    code = participant.participant.code
    too_big = "9223372036854775808"
    assert participant.client.post(f"/p/{code}/rate/{too_big}/", {"agreement": 4, "quality": 4}).status_code == 404
    assert participant.client.post(f"/p/{code}/opinion-rating/{too_big}/", {"agreement": 4}).status_code == 404
    assert participant.client.post(f"/p/{code}/rate/{'9' * 40}/", {"agreement": 4, "quality": 4}).status_code == 404
    researcher_client = Client()
    researcher_client.force_login(researcher)
    assert researcher_client.get(f"/researcher/rooms/{too_big}/").status_code == 404
    assert researcher_client.get(f"/researcher/exports/{too_big}/download/").status_code == 404
    # The largest id that fits is just an id that does not exist.
    assert participant.client.post(f"/p/{code}/rate/9223372036854775807/", {"agreement": 4, "quality": 4}).status_code in (200, 422)

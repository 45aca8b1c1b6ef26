"""A researcher moves a seat to a new browser with a one-time link; the external id alone never does (issue 12)."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import Collaboration
from deliberation.models import SeatTransfer
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _link_for(researcher, participant) -> str:
    staff = Client()
    staff.force_login(researcher)
    response = staff.post(reverse("seat_transfer_issue", args=[participant.pk]))
    assert response.status_code == 200
    return re.search(r'<code class="seat-link">http://testserver(/resume/[^<]+/)</code>', response.content.decode()).group(1)


def test_only_the_owner_or_an_editor_makes_a_seat_link(participant, researcher, outsider_researcher) -> None:
    seat = participant.participant
    stranger = Client()
    stranger.force_login(outsider_researcher)
    assert stranger.post(reverse("seat_transfer_issue", args=[seat.pk])).status_code == 404
    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=seat.room.experiment, user=viewer, role=Collaboration.Role.VIEWER)
    as_viewer = Client()
    as_viewer.force_login(viewer)
    assert as_viewer.post(reverse("seat_transfer_issue", args=[seat.pk])).status_code == 403
    assert Client().post(reverse("seat_transfer_issue", args=[seat.pk])).status_code == 302  # to the login
    assert not SeatTransfer.objects.exists()
    staff = Client()
    staff.force_login(researcher)
    assert "Make a link for" in staff.get(reverse("room_monitor", args=[seat.room_id])).content.decode()
    _link_for(researcher, seat)
    transfer = SeatTransfer.objects.get()
    assert transfer.issued_by == researcher
    # The admin's log of seat moves: the owner's own only, read-only, no token hash shown.
    from django.contrib.auth.models import Permission

    for user in (researcher, outsider_researcher):
        user.is_staff = True
        user.save()
        user.user_permissions.add(*Permission.objects.filter(codename__in=["view_seattransfer", "change_seattransfer"]))
    owner_admin, outsider_admin = Client(), Client()
    owner_admin.force_login(researcher)
    outsider_admin.force_login(outsider_researcher)
    assert [t.pk for t in owner_admin.get("/admin/deliberation/seattransfer/").context["cl"].result_list] == [transfer.pk]
    assert not list(outsider_admin.get("/admin/deliberation/seattransfer/").context["cl"].result_list)
    detail = owner_admin.get(f"/admin/deliberation/seattransfer/{transfer.pk}/change/")
    assert detail.status_code == 200 and transfer.token_sha256 not in detail.content.decode()


def test_a_seat_link_moves_the_seat_once_and_the_old_browser_loses_it(participant, researcher) -> None:
    seat = participant.participant
    old_browser = participant.client
    page = reverse("participant", args=[seat.code])
    assert old_browser.get(page).status_code == 200
    link = _link_for(researcher, seat)

    new_browser = Client()
    # Opening the link only asks (a link preview must not use it up).
    assert "Continue here" in new_browser.get(link).content.decode()
    assert new_browser.get(page).status_code == 404
    moved = new_browser.post(link)
    assert moved.status_code == 302 and moved["Location"] == page
    assert new_browser.get(page).status_code == 200
    # The old browser no longer holds the seat: not its page, not its actions, not by rejoining with the external id.
    assert old_browser.get(page).status_code == 404
    assert old_browser.post(reverse("opinion_draft", args=[seat.code]), {"text": "mine"}).status_code == 404
    rejoin = old_browser.post(reverse("join", args=[seat.room.experiment.slug]) + f"?participant_label={seat.external_id}", {"consent": "yes"})
    assert rejoin.status_code == 403
    # The link works once.
    assert Client().post(link).status_code == 410
    # The new browser rejoining with its external id is taken back to its seat.
    again = new_browser.post(reverse("join", args=[seat.room.experiment.slug]) + f"?participant_label={seat.external_id}", {"consent": "yes"})
    assert again.status_code == 302 and again["Location"] == page


def test_a_newer_link_voids_an_unused_older_one_and_made_up_tokens_fail(participant, researcher) -> None:
    seat = participant.participant
    older = _link_for(researcher, seat)
    newer = _link_for(researcher, seat)
    assert Client().post(older).status_code == 410
    assert Client().post(reverse("seat_resume", args=["made-up-token"])).status_code == 410
    assert Client().post(newer).status_code == 302


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_old_browsers_socket_closes_when_the_seat_moves_and_cannot_reconnect(participant, researcher) -> None:
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.conf import settings

    from config.asgi import application

    seat = participant.participant
    cookie = (b"cookie", f"{settings.SESSION_COOKIE_NAME}={participant.client.session.session_key}".encode())
    path = f"/ws/p/{seat.code}/"
    before = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://localhost"), cookie])
    assert (await before.connect(timeout=10))[0]
    link = await sync_to_async(_link_for)(researcher, seat)
    assert (await sync_to_async(Client().post)(link)).status_code == 302
    # The open socket is closed by the move (renders that were under way may arrive first).
    for _ in range(10):
        message = await before.receive_output(timeout=10)
        if message["type"] == "websocket.close":
            assert message["code"] == 4403
            break
    else:
        raise AssertionError("the old browser's socket stayed open")
    after = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://localhost"), cookie])
    connected, code = await after.connect(timeout=10)
    assert not connected and code == 4403

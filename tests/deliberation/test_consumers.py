"""Websocket consumers: who may connect, full state on (re)connect, live re-renders."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from config.asgi import application
from deliberation import services
from deliberation.consumers import FRAME_TOO_BIG_CLOSE_CODE
from deliberation.models import Participant
from tests.conftest import OPINIONS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://localhost")


def _cookie_for(client: Client) -> tuple[bytes, bytes]:
    return (b"cookie", f"{settings.SESSION_COOKIE_NAME}={client.session.session_key}".encode())


async def _connect(path: str, *headers: tuple[bytes, bytes]) -> tuple[WebsocketCommunicator, bool, int | None]:
    communicator = WebsocketCommunicator(application, path, headers=[*headers])
    connected, code = await communicator.connect(timeout=10)
    return communicator, connected, code


async def _receive_until(communicator: WebsocketCommunicator, needle: str, *, attempts: int = 20) -> str:
    for _ in range(attempts):
        message = await communicator.receive_from(timeout=10)
        if needle in message:
            return message
    raise AssertionError(f"{needle!r} never arrived")


async def test_a_participant_gets_their_full_state_on_connect(participant) -> None:
    communicator, connected, _ = await _connect(f"/ws/p/{participant.participant.code}/", ORIGIN, _cookie_for(participant.client))
    assert connected
    first = await communicator.receive_from(timeout=10)
    assert 'id="status"' in first and 'id="main"' in first and 'hx-swap-oob="true"' in first
    assert 'data-view="opinions"' in first
    await communicator.disconnect()


async def test_a_reconnect_renders_what_was_already_entered(participant) -> None:
    await database_sync_to_async(services.opinion_submit)(participant=participant.participant, text=OPINIONS[0])
    communicator, connected, _ = await _connect(f"/ws/p/{participant.participant.code}/", ORIGIN, _cookie_for(participant.client))
    assert connected
    message = await _receive_until(communicator, 'id="main"')
    assert 'data-view="opinion_sent"' in message and "inequality erodes trust" in message
    await communicator.disconnect()


async def test_presence_and_progress_reach_the_other_participants(participant, other_participant) -> None:
    watcher, connected, _ = await _connect(f"/ws/p/{other_participant.participant.code}/", ORIGIN, _cookie_for(other_participant.client))
    assert connected
    await watcher.receive_from(timeout=10)
    joiner, connected, _ = await _connect(f"/ws/p/{participant.participant.code}/", ORIGIN, _cookie_for(participant.client))
    assert connected
    # The watcher learns the newcomer is online.
    await _receive_until(watcher, '<li class="online" data-label="Participant A"')
    await database_sync_to_async(services.opinion_submit)(participant=participant.participant, text=OPINIONS[0])
    # Renders after earlier events may still be on their way; the new count arrives after them.
    await _receive_until(watcher, "1 of 3 opinions are in")
    await joiner.disconnect()
    await watcher.disconnect()
    count = await database_sync_to_async(lambda: Participant.objects.get(pk=participant.participant.pk).connections)()
    assert count == 0


async def test_a_socket_without_the_joining_session_is_refused(participant, outsider) -> None:
    path = f"/ws/p/{participant.participant.code}/"
    _, connected, code = await _connect(path, ORIGIN)
    assert not connected and code == 4403
    _, connected, code = await _connect(path, ORIGIN, _cookie_for(outsider.client))
    assert not connected and code == 4403


async def test_a_socket_from_a_foreign_origin_is_refused(participant) -> None:
    _, connected, _ = await _connect(
        f"/ws/p/{participant.participant.code}/", (b"origin", b"http://evil.example"), _cookie_for(participant.client)
    )
    assert not connected


async def test_an_oversized_frame_closes_the_socket(participant) -> None:
    communicator, connected, _ = await _connect(f"/ws/p/{participant.participant.code}/", ORIGIN, _cookie_for(participant.client))
    assert connected
    await communicator.receive_from(timeout=10)
    await communicator.send_to(text_data="x" * 10_000)
    for _ in range(5):
        output = await communicator.receive_output(timeout=10)
        if output["type"] == "websocket.close":
            break
    # 1009 in daphne's application range: a 1009 itself would make daphne fail the close.
    assert output == {"type": "websocket.close", "code": FRAME_TOO_BIG_CLOSE_CODE}


async def test_the_monitor_socket_is_for_the_owner_only(participant, researcher, outsider_researcher) -> None:
    room_id = participant.participant.room_id
    owner_client, outsider_client = Client(), Client()
    await database_sync_to_async(owner_client.force_login)(researcher)
    await database_sync_to_async(outsider_client.force_login)(outsider_researcher)
    _, connected, code = await _connect(f"/ws/monitor/{room_id}/", ORIGIN, _cookie_for(outsider_client))
    assert not connected and code == 4403
    monitor, connected, _ = await _connect(f"/ws/monitor/{room_id}/", ORIGIN, _cookie_for(owner_client))
    assert connected
    assert 'id="monitor"' in await monitor.receive_from(timeout=10)
    await database_sync_to_async(services.opinion_submit)(participant=participant.participant, text=OPINIONS[1])
    assert "cut waste" in await _receive_until(monitor, "cut waste")
    await monitor.disconnect()


async def test_a_flood_of_resync_frames_costs_a_few_renders_not_one_each(participant, monkeypatch, settings) -> None:
    """The review's attack: 200 ten-byte resync frames from one socket cost 200 full renders. Now a burst is
    served by one render at once and one at the end of the interval, however many frames asked."""
    from deliberation.consumers import ParticipantConsumer

    settings.CONCORD_RESYNC_MIN_INTERVAL_SECONDS = 0.3
    renders: list[bool] = []
    original = ParticipantConsumer._render

    def counting_render(self, full: bool) -> str:
        renders.append(full)
        return original(self, full)

    monkeypatch.setattr(ParticipantConsumer, "_render", counting_render)
    communicator, connected, _ = await _connect(f"/ws/p/{participant.participant.code}/", ORIGIN, _cookie_for(participant.client))
    assert connected
    await communicator.receive_from(timeout=10)  # the full state on connect
    for _ in range(200):
        await communicator.send_to(text_data='"resync"')
    frames = [await communicator.receive_from(timeout=10)]
    while not await communicator.receive_nothing(timeout=1.5):
        frames.append(await communicator.receive_from(timeout=10))
    # Full renders: the one on connect, then at most two for the 200 frames (others are renders for room
    # events, such as this socket's own presence, which carry the status only).
    assert 2 <= renders.count(True) <= 3
    assert 'id="main"' in frames[-1]  # the last answer is a full render
    await communicator.disconnect()

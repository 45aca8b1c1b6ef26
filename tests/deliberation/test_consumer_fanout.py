"""Fan-out cost: which events re-render a socket, and how bursts of events are coalesced.

Every event makes each member's socket re-read the room and render it, so under load
(bench/load.py) the number of renders is the web tier's cost. These tests pin down the
rules that keep it down: a rating re-renders no participant socket (the rater's response
carries the new form; nothing on the others' screens depends on it), and events that
arrive while a render is under way cost one more render, not one each.
"""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from config.asgi import application
from deliberation import events, services
from deliberation.consumers import ParticipantConsumer
from deliberation.models import Candidate, Presentation, Round
from tests.conftest import OPINIONS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def _channel_layer_of_this_test():
    """A channel layer built in this test's event loop, and dropped after it: the Redis layer keeps
    asyncio locks, which must not carry over into the next test's loop."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


def _consumer_for(participant_id: int) -> tuple[ParticipantConsumer, list[bool]]:
    """A consumer as connect() leaves it, whose pushes are recorded instead of rendered."""
    consumer = ParticipantConsumer()
    consumer.participant = type("P", (), {"pk": participant_id})()  # only the id is read before a render
    consumer.render_lock = asyncio.Lock()
    pushes: list[bool] = []

    async def record_push(*, full: bool) -> None:
        pushes.append(full)

    consumer.push = record_push  # type: ignore[method-assign]
    return consumer, pushes


def _message(event: events.RoomEvent) -> dict[str, object]:
    return event.as_message()


async def _settle(consumer: ParticipantConsumer) -> None:
    if consumer.render_task is not None:
        await consumer.render_task


async def test_another_members_rating_does_not_re_render_a_socket() -> None:
    consumer, pushes = _consumer_for(participant_id=1)
    await consumer.room_event(_message(events.RatingSubmitted(room_id=9, round_id=3, participant_id=2)))
    await _settle(consumer)
    assert pushes == []


async def test_a_participants_own_rating_does_not_re_render_their_socket() -> None:
    # The response to their rating request carries the new form; the socket would repeat it.
    consumer, pushes = _consumer_for(participant_id=1)
    await consumer.room_event(_message(events.RatingSubmitted(room_id=9, round_id=3, participant_id=1)))
    await _settle(consumer)
    assert pushes == []


async def test_others_finishing_and_opinions_do_re_render() -> None:
    consumer, pushes = _consumer_for(participant_id=1)
    await consumer.room_event(_message(events.ParticipantFinished(room_id=9, round_id=3, participant_id=2)))
    await _settle(consumer)
    await consumer.room_event(_message(events.OpinionSubmitted(room_id=9, round_id=3, participant_id=2)))
    await _settle(consumer)
    assert pushes == [False, False]


async def test_events_during_a_render_cost_one_more_render_not_one_each() -> None:
    consumer, pushes = _consumer_for(participant_id=1)
    release = asyncio.Event()

    async def slow_push(*, full: bool) -> None:
        pushes.append(full)
        await release.wait()

    consumer.push = slow_push  # type: ignore[method-assign]
    await consumer.room_event(_message(events.PresenceChanged(room_id=9)))
    await asyncio.sleep(0)  # the render starts and waits
    assert pushes == [False]
    for _ in range(5):
        await consumer.room_event(_message(events.PresenceChanged(room_id=9)))
    release.set()
    await _settle(consumer)
    # The render after the burst reads the state all five events left behind.
    assert pushes == [False, False]


def _open_rating(group) -> list[int]:
    for persona, text in zip(group, OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.get(room=group[0].participant.room)
    shown = []
    for index in range(2):
        candidate = Candidate.objects.create(
            round=round_, index=index, text=f"Statement {index}", backend="t", model_id="m", seed=index, prompt="p",
            rank=index + 1, shown=True,
        )
        shown.append(candidate.pk)
        for persona in group:
            Presentation.objects.create(participant=persona.participant, candidate=candidate, position=index)
    Round.objects.filter(pk=round_.pk).update(phase=Round.Phase.RATING)
    return shown


def _row_of(label: str, message: str) -> str:
    return message.split(f'data-label="{label}"', 1)[1].split("</li>", 1)[0] if f'data-label="{label}"' in message else ""


async def _socket(persona) -> WebsocketCommunicator:
    cookie = (b"cookie", f"{settings.SESSION_COOKIE_NAME}={persona.client.session.session_key}".encode())
    socket = WebsocketCommunicator(application, f"/ws/p/{persona.participant.code}/", headers=[(b"origin", b"http://localhost"), cookie])
    connected, _ = await socket.connect(timeout=10)
    assert connected
    return socket


async def test_a_member_who_ranks_is_shown_as_finished_to_the_others(group) -> None:
    shown = await database_sync_to_async(_open_rating)(group)
    ranker, watcher = group[0], group[1]
    ranker_socket, watcher_socket = await _socket(ranker), await _socket(watcher)

    for candidate_id in shown:
        await database_sync_to_async(services.rating_submit)(participant=ranker.participant, candidate_id=candidate_id, agreement=5, quality=5)
    await database_sync_to_async(services.ranking_submit)(
        participant=ranker.participant, positions={cid: position + 1 for position, cid in enumerate(shown)}
    )
    for _ in range(20):
        message = await watcher_socket.receive_from(timeout=10)
        if "finished" in _row_of("Participant A", message):
            break
    else:
        raise AssertionError("the watcher never saw Participant A finish")
    await ranker_socket.disconnect()
    await watcher_socket.disconnect()

"""Websocket consumers when the channel layer fails (Redis restarting).

All sockets of a daphne process share one blocking read on Redis. When Redis goes away that
read fails for one socket at once; the others may wait and then read from a fresh Redis that
knows none of their groups, so they would silently miss every event. So every socket of the
process is closed with a code the client reconnects on (concord.js: anything but 4403), and
what connect took (presence) is given back. The layer here is the in-memory one, made to fail
the way channels_redis does; tests/deliberation/test_fault_redis_restart.py uses a real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from redis.exceptions import ConnectionError as RedisConnectionError

from config.asgi import application
from deliberation.consumers import CHANNEL_LAYER_LOST_CLOSE_CODE
from deliberation.models import Participant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://localhost")


class BreakableLayer(InMemoryChannelLayer):
    """In memory, but able to fail like channels_redis when Redis goes away."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group_add_fails = False
        self._failures: asyncio.Queue[None] | None = None

    def failures(self) -> asyncio.Queue[None]:
        if self._failures is None:  # created on the test's loop
            self._failures = asyncio.Queue()
        return self._failures

    def fail_one_receive(self) -> None:
        """Like the one shared blocking read: a single waiting receive fails, the others keep waiting."""
        self.failures().put_nowait(None)

    async def receive(self, channel: str) -> dict[str, Any]:
        message = asyncio.ensure_future(super().receive(channel))
        failure = asyncio.ensure_future(self.failures().get())
        try:
            await asyncio.wait({message, failure}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (message, failure):
                task.cancel()
        if failure.done() and not failure.cancelled():
            if message.done() and not message.cancelled():
                self.failures().put_nowait(None)  # both at once: deliver, and fail the next receive
                return message.result()
            raise RedisConnectionError("Connection closed by server.")
        return message.result()

    async def group_add(self, group: str, channel: str) -> None:
        if self.group_add_fails:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        await super().group_add(group, channel)


@pytest.fixture
def layer() -> Iterator[BreakableLayer]:
    breakable = BreakableLayer()
    previous = channel_layers.backends.get("default")
    channel_layers.backends["default"] = breakable
    yield breakable
    if previous is None:
        channel_layers.backends.pop("default", None)
    else:
        channel_layers.backends["default"] = previous


def _cookie_for(client: Client) -> tuple[bytes, bytes]:
    return (b"cookie", f"{settings.SESSION_COOKIE_NAME}={client.session.session_key}".encode())


async def _connected(persona) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, f"/ws/p/{persona.participant.code}/", headers=[ORIGIN, _cookie_for(persona.client)])
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    assert 'id="main"' in await communicator.receive_from(timeout=10)  # the full state
    return communicator


async def _close_code(communicator: WebsocketCommunicator) -> int | None:
    """Skip renders already on their way; return the code the server closed with."""
    for _ in range(20):
        output = await communicator.receive_output(timeout=10)
        if output["type"] == "websocket.close":
            return output.get("code")
    raise AssertionError("the socket was not closed")


async def _connections(*personas) -> list[int]:
    pks = [persona.participant.pk for persona in personas]
    return await database_sync_to_async(lambda: [Participant.objects.get(pk=pk).connections for pk in pks])()


async def test_when_the_layer_fails_every_socket_closes_and_gives_back_its_presence(layer, participant, other_participant) -> None:
    sockets = [await _connected(participant), await _connected(other_participant)]
    assert await _connections(participant, other_participant) == [1, 1]

    layer.fail_one_receive()

    # The socket whose receive failed and the one still waiting both close, for their clients to reconnect.
    assert [await _close_code(socket) for socket in sockets] == [CHANNEL_LAYER_LOST_CLOSE_CODE] * 2
    for socket in sockets:
        await socket.disconnect()  # the client's side of the close
    assert await _connections(participant, other_participant) == [0, 0]

    # Once the layer works again, a reconnect gets the full state and counts again.
    again = await _connected(participant)
    assert await _connections(participant) == [1]
    await again.disconnect()
    assert await _connections(participant) == [0]


async def test_a_socket_that_cannot_join_its_group_is_refused_and_not_counted(layer, participant) -> None:
    layer.group_add_fails = True
    communicator = WebsocketCommunicator(application, f"/ws/p/{participant.participant.code}/", headers=[ORIGIN, _cookie_for(participant.client)])
    connected, code = await communicator.connect(timeout=10)
    assert not connected and code == CHANNEL_LAYER_LOST_CLOSE_CODE
    assert await _connections(participant) == [0]
    # The client retries with backoff; once the layer is back it gets in.
    layer.group_add_fails = False
    again = await _connected(participant)
    await again.disconnect()
    assert await _connections(participant) == [0]

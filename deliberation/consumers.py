"""Websocket consumers: authorise, then re-render from the database on every event.

Events only say that a room changed. Each participant gets their own partial,
because what they see (order of statements, their forms, their arm) differs.
On connect — which includes every reconnect — the full state is sent.

When the channel layer fails (Redis restarting), every socket of this process is closed (with
CHANNEL_LAYER_LOST_CLOSE_CODE), and browsers reconnect: group memberships live in Redis, so a
restart without persistence forgets them, and a socket left open would silently miss every
event from then on. Reconnecting joins the group again and renders the full current state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError, connection
from django.template.loader import render_to_string

from accounts import permissions

from . import selectors, services
from .events import PRIVATE_TO_PARTICIPANT, SeatMoved, room_group
from .models import Participant, Room
from .seats import holds_seat

logger = logging.getLogger(__name__)

# Participants never send more than a ping; anything bigger is abuse.
MAX_CLIENT_FRAME_BYTES = 4096
# Close codes: daphne (autobahn) lets an application close only with 1000 or 3000-4999 (it raises on
# the others, and the socket stays open), and concord.js reconnects on every code but 4403. These
# mirror 1011 (internal error) and 1012 (service restart) in the application range.
RENDER_FAILED_CLOSE_CODE = 4011
CHANNEL_LAYER_LOST_CLOSE_CODE = 4012
# 1009 ("message too big") in the application range, for the same reason.
FRAME_TOO_BIG_CLOSE_CODE = 4009


def _channel_layer_errors() -> tuple[type[BaseException], ...]:
    # What the Redis channel layer raises when Redis is unreachable; the in-memory layer raises none.
    errors: list[type[BaseException]] = [ConnectionError]
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency of channels-redis and Celery
        pass
    else:
        errors.append(RedisError)
    return tuple(errors)


CHANNEL_LAYER_ERRORS = _channel_layer_errors()

# Every socket of this process is re-rendered on these few long-lived threads, in parallel, and
# each thread keeps its database connection: a render is a handful of short queries, and opening
# a connection for each would cost as much again (request threads cannot keep theirs: under ASGI
# each request runs on a thread of its own). It also caps the connections renders take.
RENDER_THREADS = 4
_render_executor = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="ws-render")


def _render_keeping_connection(render: Callable[[], str]) -> str:
    try:
        return render()
    except DatabaseError:
        connection.close()  # never keep a connection that failed: the next render opens a fresh one
        raise


def close_render_connections() -> None:
    """Close the connections the render threads keep (at the end of a test session, so the test
    database can be dropped). Each thread closes its own; later renders start fresh threads."""
    global _render_executor
    executor, _render_executor = _render_executor, ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="ws-render")
    # The barrier holds each close on its own thread until all have one, so every thread gets one.
    barrier = threading.Barrier(RENDER_THREADS)

    def close_on_this_thread() -> None:
        connection.close()
        barrier.wait(timeout=10)

    for future in [executor.submit(close_on_this_thread) for _ in range(RENDER_THREADS)]:
        future.result(timeout=20)
    executor.shutdown(wait=True)


# The sockets of this process that are in (or joining) a room group, to be closed when the layer fails.
_grouped_sockets: weakref.WeakSet[RoomSocketConsumer] = weakref.WeakSet()


def _channel_layer_lost(*, noticed_by: RoomSocketConsumer) -> None:
    """One socket's receive (or group call) failed: the others' group memberships may be gone too.

    All sockets of a process share one blocking read on Redis, so when Redis goes away one of them
    fails at once; the others would wait, and might reconnect to a fresh Redis that knows none of
    their groups. So all of them are closed, and their clients reconnect.
    """
    others = [consumer for consumer in list(_grouped_sockets) if consumer is not noticed_by]
    logger.warning("Channel layer failed: closing %d socket(s) so that their clients reconnect", len(others) + 1)
    for consumer in others:
        consumer.channel_layer_lost()


class RoomSocketConsumer(AsyncWebsocketConsumer):
    """A socket in a room's group that survives the channel layer failing: it closes, and the client reconnects."""

    group: str
    accepted: bool = False
    layer_lost: bool = False
    close_task: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except CHANNEL_LAYER_ERRORS:
            # The layer's receive (or connect's group_add) failed and ended the consumer's loop.
            # Unhandled, daphne would log it and close with 1011, but disconnect() would never run.
            logger.warning("Channel layer failed under socket %s", getattr(self, "channel_name", "?"), exc_info=True)
            self.layer_lost = True
            _grouped_sockets.discard(self)
            _channel_layer_lost(noticed_by=self)
            await self.release()
            await self.close_for_reconnect()
        finally:
            _grouped_sockets.discard(self)

    async def join_room_group(self, group: str) -> bool:
        """Join `group`; False when the layer failed meanwhile (the socket is then closed)."""
        self.group = group
        _grouped_sockets.add(self)
        await self.channel_layer.group_add(group, self.channel_name)
        if self.layer_lost:
            await self.close_for_reconnect()
            return False
        return True

    async def close_for_reconnect(self) -> None:
        try:
            await self.close(code=CHANNEL_LAYER_LOST_CLOSE_CODE)
        except Exception:  # the client may be gone already
            logger.warning("Could not close socket %s", getattr(self, "channel_name", "?"), exc_info=True)

    async def accept(self, subprotocol: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await super().accept(subprotocol, headers)
        self.accepted = True

    async def leave_room_group(self) -> None:
        _grouped_sockets.discard(self)
        if hasattr(self, "group"):
            try:
                await self.channel_layer.group_discard(self.group, self.channel_name)
            except CHANNEL_LAYER_ERRORS:
                pass  # the group went with the layer, or its entry expires by itself

    def channel_layer_lost(self) -> None:
        """Another socket of this process saw the layer fail: close, so the client reconnects."""
        _grouped_sockets.discard(self)
        self.layer_lost = True
        if self.accepted and self.close_task is None:
            self.close_task = asyncio.ensure_future(self.close_for_reconnect())

    async def release(self) -> None:
        """Undo what connect took, other than the group (presence, for a participant)."""


class ParticipantConsumer(RoomSocketConsumer):
    participant: Participant
    # Counted in the participant's presence (presence_connect ran, presence_disconnect has not).
    present: bool = False
    last_main_key: str
    render_lock: asyncio.Lock
    # Set by an event, cleared by the render that reads the state after it.
    stale: bool = False
    render_task: asyncio.Task[None] | None = None
    # Set by a "resync" frame, cleared by the full render that answers it (resync_task serves them).
    resync_wanted: bool = False
    resync_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        code = self.scope["url_route"]["kwargs"]["code"]
        session = self.scope.get("session")
        allowed = session is not None and await database_sync_to_async(holds_seat)(session, code)
        participant = await database_sync_to_async(selectors.participant_by_code)(code) if allowed else None
        if participant is None:
            await self.close(code=4403)
            return
        self.participant = participant
        self.last_main_key = ""
        self.render_lock = asyncio.Lock()
        if not await self.join_room_group(room_group(participant.room_id)):
            return
        await self.accept()
        await database_sync_to_async(services.presence_connect)(participant_id=participant.pk)
        self.present = True
        await self.push(full=True)

    async def disconnect(self, code: int) -> None:
        for task in (self.render_task, self.resync_task):
            if task is not None:
                task.cancel()
        # Presence first: leaving the group may wait on a Redis that is down.
        await self.release()
        await self.leave_room_group()

    async def release(self) -> None:
        if self.present:
            self.present = False
            await database_sync_to_async(services.presence_disconnect)(participant_id=self.participant.pk)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        size = len(text_data or "") + len(bytes_data or b"")
        if size > MAX_CLIENT_FRAME_BYTES:
            await self.close(code=FRAME_TOO_BIG_CLOSE_CODE)
            return
        # The client asks for a full re-render after it regains focus or suspects a gap.
        if text_data and '"resync"' in text_data:
            self.request_resync()

    def request_resync(self) -> None:
        """Serve a resync now if none was served in the last CONCORD_RESYNC_MIN_INTERVAL_SECONDS, else
        once at the end of that interval, however many frames asked meanwhile: a flood of resync
        frames from one socket costs at most one full render per interval, not one each (each is a
        full page render: 200 ten-byte frames used to cost 200 renders, 4.6 s of server work)."""
        self.resync_wanted = True
        if self.resync_task is None or self.resync_task.done():
            self.resync_task = asyncio.create_task(self._serve_resyncs())

    async def _serve_resyncs(self) -> None:
        try:
            while self.resync_wanted:
                self.resync_wanted = False
                await self.push(full=True)
                await asyncio.sleep(settings.CONCORD_RESYNC_MIN_INTERVAL_SECONDS)
        except Exception:
            logger.exception("Could not resync participant %s", self.participant.pk)
            await self.close(code=RENDER_FAILED_CLOSE_CODE)

    async def room_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == SeatMoved.type_name:
            # The seat may have moved away from this browser: a socket that no longer holds it closes
            # (4403: concord.js does not reconnect), so the old browser stops seeing the room at once.
            if event.get("participant_id") == self.participant.pk and not await database_sync_to_async(holds_seat)(self.scope["session"], self.participant.code):
                await self.close(code=4403)
            return
        if event.get("event") in PRIVATE_TO_PARTICIPANT:
            # Another member's rating changes nothing on this screen, and one's own rating came from a
            # request whose response swapped in the new form: rendering it again would double the cost
            # of the busiest phase (docs/benchmarks.md, Load). A second tab of the same participant
            # re-syncs when it is shown (concord.js, visibilitychange).
            return
        # An event only says "this room changed" and a render reads the current state, so events
        # that arrive while a render is under way need one more render after it, not one each.
        # Under load (a phase change is two events; hundreds of rooms share one process) this keeps
        # the work per socket bounded instead of queueing stale renders.
        self.stale = True
        if self.render_task is None or self.render_task.done():
            self.render_task = asyncio.create_task(self._render_while_stale())

    async def _render_while_stale(self) -> None:
        try:
            while self.stale:
                self.stale = False
                await self.push(full=False)
        except Exception:
            # As when a handler fails: close, and the client reconnects and gets the full state.
            logger.exception("Could not push to participant %s", self.participant.pk)
            await self.close(code=RENDER_FAILED_CLOSE_CODE)

    async def push(self, *, full: bool) -> None:
        async with self.render_lock:
            # The lock keeps this socket's renders in order; renders of different sockets overlap.
            html = await sync_to_async(_render_keeping_connection, thread_sensitive=False, executor=_render_executor)(
                lambda: self._render(full)
            )
            if html and not self.layer_lost:  # a socket being closed for reconnecting gets nothing more
                await self.send(text_data=html)

    def _render(self, full: bool) -> str:
        state = selectors.room_state_for(self.participant)
        parts = [render_to_string("deliberation/partials/status.html", {"state": state, "oob": True})]
        main_key = state.main_key()
        if full or main_key != self.last_main_key:
            self.last_main_key = main_key
            # Page timings: a screen pushed over the socket counts as shown (repeats are not recorded twice).
            services.page_view_record(participant_id=state.participant.pk, view=state.view, round_id=state.round.pk, phase=state.round.phase)
            parts.append(render_to_string("deliberation/partials/main.html", {"state": state, "oob": True}))
        return "\n".join(parts)


class MonitorConsumer(RoomSocketConsumer):
    room: Room

    async def connect(self) -> None:
        room_id = int(self.scope["url_route"]["kwargs"]["room_id"])
        user = self.scope.get("user")
        room = await database_sync_to_async(lambda: Room.objects.select_related("experiment").filter(pk=room_id).first())()
        if room is None or user is None or not await database_sync_to_async(permissions.can_monitor)(user, room):
            await self.close(code=4403)
            return
        self.room = room
        if not await self.join_room_group(room_group(room.pk)):
            return
        await self.accept()
        await self.push()

    async def disconnect(self, code: int) -> None:
        await self.leave_room_group()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if len(text_data or "") + len(bytes_data or b"") > MAX_CLIENT_FRAME_BYTES:
            await self.close(code=FRAME_TOO_BIG_CLOSE_CODE)

    async def room_event(self, event: dict[str, Any]) -> None:
        await self.push()

    async def push(self) -> None:
        html = await database_sync_to_async(self._render)()
        await self.send(text_data=html)

    def _render(self) -> str:
        return render_to_string("deliberation/partials/monitor_body.html", {"monitor": selectors.monitor_state(self.room), "oob": True})

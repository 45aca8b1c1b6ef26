"""Typed real-time events. Only services send them, and only after commit.

Consumers treat every event as "something in this room changed": they re-read
state from the database and render each participant's own partial, so an event
carries ids and hints, never rendered data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import ClassVar

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def room_group(room_id: int) -> str:
    return f"room-{room_id}"


@dataclass(frozen=True)
class RoomEvent:
    type_name: ClassVar[str] = "room.event"
    room_id: int

    def as_message(self) -> dict[str, object]:
        # Channels dispatches on "type": every event lands in the consumer's room_event handler.
        return {"type": "room.event", "event": self.type_name, **asdict(self)}


@dataclass(frozen=True)
class PresenceChanged(RoomEvent):
    type_name: ClassVar[str] = "presence.changed"


@dataclass(frozen=True)
class ParticipantJoined(RoomEvent):
    type_name: ClassVar[str] = "participant.joined"
    participant_id: int


@dataclass(frozen=True)
class PhaseChanged(RoomEvent):
    type_name: ClassVar[str] = "phase.changed"
    round_id: int
    phase: str


@dataclass(frozen=True)
class OpinionSubmitted(RoomEvent):
    type_name: ClassVar[str] = "opinion.submitted"
    round_id: int
    participant_id: int


@dataclass(frozen=True)
class MediationProgress(RoomEvent):
    type_name: ClassVar[str] = "mediation.progress"
    round_id: int
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class CandidatesReady(RoomEvent):
    type_name: ClassVar[str] = "candidates.ready"
    round_id: int


@dataclass(frozen=True)
class RatingSubmitted(RoomEvent):
    """One participant's answer on the rating page. Only that participant's screen (and the
    researcher's monitor) shows it, so the other members' sockets skip it."""

    type_name: ClassVar[str] = "rating.submitted"
    round_id: int
    participant_id: int


@dataclass(frozen=True)
class ParticipantFinished(RoomEvent):
    """A participant submitted their ranking: everyone's presence list shows them as finished."""

    type_name: ClassVar[str] = "participant.finished"
    round_id: int
    participant_id: int


@dataclass(frozen=True)
class SeatMoved(RoomEvent):
    """A participant's seat moved to a new browser (a researcher's seat link): their sockets in other
    browsers check their seat again, and close."""

    type_name: ClassVar[str] = "seat.moved"
    participant_id: int


# Events that change only what their own participant sees, and only through a request of theirs whose
# response already carries the new screen: participant sockets do not re-render for them (the monitor does).
PRIVATE_TO_PARTICIPANT = frozenset({RatingSubmitted.type_name})


def send_now(event: RoomEvent) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(room_group(event.room_id), event.as_message())
    except Exception:  # A lost event must never undo a committed write: clients re-sync on reconnect.
        logger.exception("Could not send %s", event)


def send_on_commit(event: RoomEvent) -> None:
    transaction.on_commit(lambda: send_now(event))

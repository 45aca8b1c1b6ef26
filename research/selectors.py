"""Reads for the researcher pages: an experiment's rooms, the live cohort, exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from accounts import permissions
from deliberation.models import Experiment, Room, Round

from .models import DatasetExport

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractUser, AnonymousUser


def experiments_for(user: AbstractUser | AnonymousUser) -> QuerySet[Experiment]:
    """The experiments `user` may see (accounts.permissions), newest first."""
    return Experiment.objects.filter(permissions.experiment_filter(user)).order_by("-created_at")


def rooms_for_experiment(experiment: Experiment) -> QuerySet[Room]:
    return experiment.rooms.select_related("arm", "question").prefetch_related("rounds").order_by("-id")


@dataclass
class CohortRoom:
    room: Room
    round: Round
    joined: int
    connected: int
    opinions: int
    finished: int
    dropped: int
    released: int
    waiting_seconds: float | None  # how long a forming group has waited so far


@dataclass
class CohortState:
    experiment: Experiment
    rooms: list[CohortRoom]
    totals: dict[str, int]
    generated_at: datetime


def cohort_state(experiment: Experiment) -> CohortState:
    """Every room of an experiment at a glance, for the live cohort monitor."""
    experiment = Experiment.objects.get(pk=experiment.pk)
    now = timezone.now()
    rooms = (
        experiment.rooms.select_related("arm", "question")
        .annotate(
            joined=Count("participants", distinct=True),
            connected=Count("participants", filter=Q(participants__connections__gt=0), distinct=True),
            finished=Count("participants", filter=Q(participants__finished_at__isnull=False), distinct=True),
            dropped=Count("participants", filter=Q(participants__dropped_out_at__isnull=False), distinct=True),
            released=Count("participants", filter=Q(participants__release__isnull=False), distinct=True),
        )
        .order_by("-id")
    )
    # Each room's latest round (a later index overwrites an earlier one).
    rounds = {
        r.room_id: r
        for r in Round.objects.filter(room__experiment=experiment).order_by("room_id", "index").annotate(n_opinions=Count("opinions"))
    }
    rows = []
    for room in rooms:
        round_ = rounds[room.pk]
        rows.append(
            CohortRoom(
                room=room, round=round_, joined=room.joined, connected=room.connected, opinions=round_.n_opinions,
                finished=room.finished, dropped=room.dropped, released=room.released,
                waiting_seconds=(now - room.created_at).total_seconds() if round_.phase == Round.Phase.WAITING else None,
            )
        )
    totals = {
        "rooms": len(rows),
        "waiting": sum(1 for r in rows if r.round.phase == Round.Phase.WAITING),
        "running": sum(1 for r in rows if r.round.phase not in (Round.Phase.WAITING, Round.Phase.DONE)),
        "done": sum(1 for r in rows if r.round.phase == Round.Phase.DONE),
        "participants": sum(r.joined for r in rows),
        "connected": sum(r.connected for r in rows),
        "finished": sum(r.finished for r in rows),
        "dropped": sum(r.dropped for r in rows),
        "released": sum(r.released for r in rows),
    }
    return CohortState(experiment=experiment, rooms=rows, totals=totals, generated_at=now)


def exports_for(experiment: Experiment) -> QuerySet[DatasetExport]:
    return DatasetExport.objects.filter(experiment=experiment).select_related("requested_by").order_by("-created_at", "-id")


def export_visible_to(user: AbstractUser | AnonymousUser, export_id: int) -> DatasetExport | None:
    return DatasetExport.objects.filter(pk=export_id, experiment__in=experiments_for(user)).select_related("experiment").first()

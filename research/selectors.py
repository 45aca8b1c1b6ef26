"""Reads for the researcher pages: an experiment's rooms, the live cohort, exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.db.models import Count, Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from accounts import permissions
from deliberation.models import AttentionCheck, Experiment, Participant, Room, Round

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


# --- Exclusion rules (analytics and the export's exclusions table) ----------------------------------------------


class ExclusionRule:
    """Pre-registrable exclusion rules; each names the participants it removes from an analysis.

    - dropouts: recorded as dropped out (a deadline passed without their opinion or ranking) and not finished;
    - failed_attention: failed an attention check (the first answer counts);
    - incomplete_groups: every member of a group whose round did not end `completed`, or in which a member
      did not finish (a group that did not run as designed).
    """

    DROPOUTS = "dropouts"
    FAILED_ATTENTION = "failed_attention"
    INCOMPLETE_GROUPS = "incomplete_groups"


EXCLUSION_RULES: dict[str, str] = {
    ExclusionRule.DROPOUTS: "Dropouts (recorded as dropped out, not finished)",
    ExclusionRule.FAILED_ATTENTION: "Participants who failed an attention check",
    ExclusionRule.INCOMPLETE_GROUPS: "Groups that did not finish as designed (round not completed, or a member did not finish)",
}


def parse_exclusion_rules(values: list[str]) -> tuple[str, ...]:
    """The known rules among `values` (e.g. the page's ?exclude=...), in the registry's order; unknown ones are ignored."""
    return tuple(rule for rule in EXCLUSION_RULES if rule in values)


def incomplete_rooms(experiment: Experiment) -> QuerySet[Room]:
    unfinished_round = Round.objects.filter(room=OuterRef("pk")).exclude(outcome=Round.Outcome.COMPLETED)
    unfinished_member = Participant.objects.filter(room=OuterRef("pk"), finished_at__isnull=True)
    return experiment.rooms.filter(Exists(unfinished_round) | Exists(unfinished_member))


def participants_excluded_by(experiment: Experiment, rule: str) -> QuerySet[Participant]:
    """The participants of `experiment` that `rule` removes."""
    participants = Participant.objects.filter(room__experiment=experiment)
    if rule == ExclusionRule.DROPOUTS:
        return participants.filter(dropped_out_at__isnull=False, finished_at__isnull=True)
    if rule == ExclusionRule.FAILED_ATTENTION:
        return participants.filter(Exists(AttentionCheck.objects.filter(participant=OuterRef("pk"), passed=False)))
    if rule == ExclusionRule.INCOMPLETE_GROUPS:
        return participants.filter(room__in=incomplete_rooms(experiment))
    raise ValueError(f"unknown exclusion rule {rule!r}; known: {', '.join(EXCLUSION_RULES)}")


def excluded_participants(experiment: Experiment, rules: tuple[str, ...]) -> QuerySet[Participant]:
    """The union of what `rules` remove, as a query (used as a subquery: nothing is read into memory)."""
    condition = Q(pk__in=[])
    for rule in rules:
        condition |= Q(pk__in=participants_excluded_by(experiment, rule).values("pk"))
    return Participant.objects.filter(room__experiment=experiment).filter(condition)


@dataclass(frozen=True)
class ExclusionCount:
    rule: str
    label: str
    participants: int
    groups: int


def exclusion_counts(experiment: Experiment, rules: tuple[str, ...]) -> list[ExclusionCount]:
    """How many participants (and groups with at least one of them) each rule, and all together, remove."""
    rows = []
    for rule in rules:
        removed = participants_excluded_by(experiment, rule)
        rows.append(ExclusionCount(rule, EXCLUSION_RULES[rule], removed.count(), removed.values("room_id").distinct().count()))
    if len(rules) > 1:
        removed = excluded_participants(experiment, rules)
        rows.append(ExclusionCount("+".join(rules), "All of these together", removed.count(), removed.values("room_id").distinct().count()))
    return rows

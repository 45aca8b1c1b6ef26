"""Who may see and change which experiment: the one rule every researcher view, socket and admin asks.

Today: a researcher sees the experiments they own; staff see all. (The security issue adds
collaborators and tightens the staff rule here, in one place.)

accounts sits below the rooms in the layering (see pyproject's import contracts): it names no
model of deliberation, so the rule is expressed as a filter over any queryset that reaches an
experiment through `path`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import Q, QuerySet

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractUser, AnonymousUser
    from django.http import HttpRequest

User = "AbstractUser | AnonymousUser"


def sees_every_experiment(user: AbstractUser | AnonymousUser) -> bool:
    return bool(user.is_authenticated and user.is_staff)


def experiment_filter(user: AbstractUser | AnonymousUser, *, path: str = "") -> Q:
    """A filter keeping the rows (reached through `path`, e.g. "room__experiment__") of experiments `user` may see."""
    if not user.is_authenticated:
        return Q(pk__in=[])
    if sees_every_experiment(user):
        return Q()
    return Q(**{f"{path}owner": user})


def can_see_experiment(user: AbstractUser | AnonymousUser, experiment: Any) -> bool:
    return bool(user.is_authenticated and (sees_every_experiment(user) or experiment.owner_id == user.pk))


def can_monitor(user: AbstractUser | AnonymousUser, room: Any) -> bool:
    return can_see_experiment(user, room.experiment)


class OwnedByResearcherAdmin(admin.ModelAdmin):
    """Researchers see only what belongs to their own experiments in the admin; superusers see all."""

    # The lookup from this admin's model to its experiment ("pk" for the experiment itself).
    experiment_path = "experiment"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        path = "" if self.experiment_path == "pk" else f"{self.experiment_path}__"
        return queryset.filter(**{f"{path}owner": request.user})

"""Who may see and change which experiment: the one rule every researcher view, socket, download and admin asks.

- The owner of an experiment sees and changes it.
- A collaborator (accounts.models.Collaboration) sees it; an *editor* may also change it (pause,
  resume, start rooms, request exports, external ids included). A *viewer* only sees it.
- Superusers see and change everything. Staff status alone grants nothing: it only lets a
  researcher into the admin, where the same rule applies.

accounts sits below the rooms in the layering (see pyproject's import contracts): it names no
model of deliberation, so the rule is expressed as a filter over any queryset that reaches an
experiment through `path`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import NotRelationField, get_fields_from_path
from django.core.exceptions import FieldDoesNotExist
from django.db.models import Model, Q, QuerySet

from .models import Collaboration

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
    from django.http import HttpRequest

EXPERIMENT_LABEL = "deliberation.Experiment"


def sees_every_experiment(user: AbstractBaseUser | AnonymousUser) -> bool:
    return bool(user.is_authenticated and getattr(user, "is_superuser", False))


def experiment_filter(user: AbstractBaseUser | AnonymousUser, *, path: str = "", change: bool = False) -> Q:
    """A filter keeping the rows (reached through `path`, e.g. "room__experiment__") of experiments `user`
    may see (or, with `change`, may change)."""
    if not user.is_authenticated:
        return Q(pk__in=[])
    if sees_every_experiment(user):
        return Q()
    shared = Collaboration.objects.filter(user_id=user.pk)
    if change:
        shared = shared.filter(role=Collaboration.Role.EDITOR)
    # A subquery, not a join: an experiment with several collaborators stays one row.
    return Q(**{f"{path}owner_id": user.pk}) | Q(**{f"{path}pk__in": shared.values("experiment_id")})


def role_of(user: AbstractBaseUser | AnonymousUser, experiment: Any) -> str | None:
    """"superuser", "owner", "editor", "viewer", or None when `user` may not see `experiment`."""
    if not user.is_authenticated:
        return None
    if sees_every_experiment(user):
        return "superuser"
    if experiment.owner_id == user.pk:
        return "owner"
    return Collaboration.objects.filter(user_id=user.pk, experiment_id=experiment.pk).values_list("role", flat=True).first()


def can_see_experiment(user: AbstractBaseUser | AnonymousUser, experiment: Any) -> bool:
    return role_of(user, experiment) is not None


def can_change_experiment(user: AbstractBaseUser | AnonymousUser, experiment: Any) -> bool:
    """Pause, resume, start rooms, request exports: the owner, an editor, or a superuser."""
    return role_of(user, experiment) in ("superuser", "owner", Collaboration.Role.EDITOR)


def can_export_external_ids(user: AbstractBaseUser | AnonymousUser, experiment: Any) -> bool:
    """External ids identify people: only those who may change the experiment export or download them."""
    return can_change_experiment(user, experiment)


def can_monitor(user: AbstractBaseUser | AnonymousUser, room: Any) -> bool:
    return can_see_experiment(user, room.experiment)


def path_to_experiment(model: type[Model], *, depth: int = 4) -> str | None:
    """The lookup from `model` to its experiment ("" for the experiment itself), following foreign keys; None if none."""
    if model._meta.label == EXPERIMENT_LABEL:
        return ""
    frontier: list[tuple[type[Model], str]] = [(model, "")]
    for _ in range(depth):
        following: list[tuple[type[Model], str]] = []
        for current, prefix in frontier:
            for field in current._meta.get_fields():
                if not (field.many_to_one and field.concrete) or field.related_model is None:
                    continue
                related = field.related_model
                if isinstance(related, str):
                    continue
                if related._meta.label == EXPERIMENT_LABEL:
                    return f"{prefix}{field.name}__"
                following.append((related, f"{prefix}{field.name}__"))
        frontier = following
    return None


def restrict_to_experiments(queryset: QuerySet, user: AbstractBaseUser | AnonymousUser, *, change: bool = False) -> QuerySet:
    """`queryset` kept to rows of experiments `user` may see (or change); rows unrelated to experiments pass."""
    path = path_to_experiment(queryset.model)
    if path is None:
        return queryset
    return queryset.filter(experiment_filter(user, path=path, change=change))


class ExperimentChoicesMixin:
    """Foreign-key choices in the admin (model admins and inlines alike) limited to the experiments, or
    things of experiments, the researcher may change: nobody adds an arm, a room or a collaborator to
    someone else's study."""

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if not sees_every_experiment(request.user) and db_field.related_model is not None:
            path = path_to_experiment(db_field.related_model)
            if path is not None:
                base = kwargs.get("queryset")
                if base is None:
                    base = db_field.related_model._default_manager.all()
                kwargs["queryset"] = base.filter(experiment_filter(request.user, path=path, change=True))
        return super().formfield_for_foreignkey(db_field, request, **kwargs)  # type: ignore[misc]


class OwnedByResearcherAdmin(ExperimentChoicesMixin, admin.ModelAdmin):
    """In the admin, researchers see only rows of experiments they may see, change only rows of
    experiments they may change, and choose (in foreign keys) only experiments, or things of
    experiments, they may change. Superusers see all."""

    # The lookup from this admin's model to its experiment ("pk" for the experiment itself).
    experiment_path = "experiment"

    def _path(self) -> str:
        return "" if self.experiment_path == "pk" else f"{self.experiment_path}__"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).filter(experiment_filter(request.user, path=self._path()))

    def get_list_filter(self, request: HttpRequest) -> Any:
        """Sidebar filters over a relation (an experiment, a room) offer only the related rows of this
        admin's own (already limited) rows: Django's default lists every experiment by name."""
        limited: list[Any] = []
        for entry in super().get_list_filter(request):
            if isinstance(entry, str):
                try:
                    field = get_fields_from_path(self.model, entry)[-1]
                except (FieldDoesNotExist, NotRelationField):
                    field = None
                if field is not None and field.is_relation:
                    entry = (entry, admin.RelatedOnlyFieldListFilter)
            limited.append(entry)
        return limited

    def _may_change(self, request: HttpRequest, obj: Any) -> bool:
        if obj is None or sees_every_experiment(request.user):
            return True
        return type(obj)._default_manager.filter(pk=obj.pk).filter(experiment_filter(request.user, path=self._path(), change=True)).exists()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self._may_change(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self._may_change(request, obj)

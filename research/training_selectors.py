"""Reads for the training pages: the runs a researcher may follow, the model versions with their lineage
and use, and the arms a researcher may point at a version (accounts.permissions decides)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts import permissions
from deliberation.models import Arm, Candidate, Experiment, GeneratorVersion

from .models import TrainingRun

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser


def training_runs_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[TrainingRun]:
    """Runs on the data of experiments `user` may see (a run on several experiments: any one of them), and the
    evaluations of generator versions (on the dev groups, no study's data: like the versions, seen by every researcher)."""
    visible = Experiment.objects.filter(permissions.experiment_filter(user)).values("pk")
    return (
        TrainingRun.objects.filter(Q(experiments__in=visible) | Q(kind=TrainingRun.Kind.EVALUATION))
        .distinct()
        .select_related("generator_version", "reward_model_version", "parent", "requested_by", "evaluated_version")
        .prefetch_related("experiments")
    )


def training_run_visible_to(user: AbstractBaseUser | AnonymousUser, run_id: int) -> TrainingRun | None:
    return training_runs_for(user).filter(pk=run_id).first()


def training_run_waiting_for_worker(run: TrainingRun, *, now: datetime | None = None) -> bool:
    """Whether a run still pending after CONCORD_TRAINING_WORKER_WAIT_SECONDS is most likely waiting for a
    worker on the `training` queue (Celery). In-process (the embedded default) it starts at once, so never."""
    if not settings.USE_CELERY or run.status != TrainingRun.Status.PENDING:
        return False
    now = now or timezone.now()
    return run.created_at < now - timedelta(seconds=settings.CONCORD_TRAINING_WORKER_WAIT_SECONDS)


def may_evaluate(user: AbstractBaseUser | AnonymousUser) -> bool:
    """An evaluation spends the generator's time (a GPU's, in production): researchers who own or edit an experiment."""
    return Experiment.objects.filter(permissions.experiment_filter(user, change=True)).exists()


def training_run_retryable_by(user: AbstractBaseUser | AnonymousUser, run: TrainingRun) -> bool:
    """A failed run may be retried by whoever may train on all of its data (research.training.training_run_retry),
    or, an evaluation, by whoever may start one."""
    if run.kind == TrainingRun.Kind.EVALUATION:
        return run.status == TrainingRun.Status.FAILED and run.evaluated_version_id is not None and may_evaluate(user)
    return run.status == TrainingRun.Status.FAILED and all(
        permissions.can_change_experiment(user, experiment) for experiment in run.experiments.all()
    )


def changeable_experiments(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Experiment]:
    """Experiments whose data `user` may train on and whose arms `user` may change (owner or editor)."""
    return Experiment.objects.filter(permissions.experiment_filter(user, change=True)).order_by("-created_at")


def changeable_arms(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Arm]:
    return Arm.objects.filter(experiment__in=changeable_experiments(user)).select_related("experiment", "generator_version").order_by(
        "experiment__slug", "name"
    )


@dataclass
class VersionRow:
    version: GeneratorVersion
    # Arms (of experiments the researcher may see) that name it, and experiments whose candidates it wrote.
    arms: list[Arm] = field(default_factory=list)
    experiments_generated: list[str] = field(default_factory=list)
    runs: list[TrainingRun] = field(default_factory=list)
    # Its latest evaluation run (evaluate_generator on the dev groups), finished or not, and the latest done one.
    evaluation: TrainingRun | None = None
    evaluated: TrainingRun | None = None

    @property
    def evaluation_headline(self) -> list[dict[str, object]]:
        """Per evaluated configuration (the version; with a base comparison, the base too): label and usable rates."""
        if self.evaluated is None:
            return []
        return [
            {"label": run["label"], "usable_rate": run["summary"].get("usable_rate"), "shown_usable_rate": run["summary"].get("shown_usable_rate")}
            for run in self.evaluated.report.get("runs", [])
        ]


def generator_versions_overview(user: AbstractBaseUser | AnonymousUser) -> list[VersionRow]:
    """Every generator version with its parent, data and metrics, and where the researcher's experiments used it."""
    visible = Experiment.objects.filter(permissions.experiment_filter(user))
    rows = {version.pk: VersionRow(version) for version in GeneratorVersion.objects.select_related("parent")}
    for arm in Arm.objects.filter(experiment__in=visible, generator_version__isnull=False).select_related("experiment").order_by("pk"):
        if arm.generator_version_id is not None:
            rows[arm.generator_version_id].arms.append(arm)
    used: dict[int, set[str]] = defaultdict(set)
    for version_id, slug in (
        Candidate.objects.filter(round__room__experiment__in=visible, generator_version__isnull=False)
        .values_list("generator_version_id", "round__room__experiment__slug")
        .distinct()
    ):
        used[version_id].add(slug)
    for run in training_runs_for(user).filter(generator_version__isnull=False):
        assert run.generator_version_id is not None
        rows[run.generator_version_id].runs.append(run)
    for version_id, slugs in used.items():
        rows[version_id].experiments_generated = sorted(slugs)
    # Newest first: the first seen per version is its latest.
    for evaluation in TrainingRun.objects.filter(kind=TrainingRun.Kind.EVALUATION, evaluated_version__isnull=False).order_by("-created_at", "-id"):
        row = rows[evaluation.evaluated_version_id]  # type: ignore[index]
        if row.evaluation is None:
            row.evaluation = evaluation
        if row.evaluated is None and evaluation.status == TrainingRun.Status.DONE:
            row.evaluated = evaluation
    return list(rows.values())

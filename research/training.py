"""Training from the product: a researcher starts a run on the researcher pages, a task runs it.

`training_run_start` checks the request (the researcher must be the owner or an editor of every
experiment whose data it uses; accounts.permissions), records a TrainingRun and queues
`research.tasks.train_model` by name (the `training` queue under Celery; in-process, off the request
path, in the embedded default). `training_run_execute` (the task's body) builds the dataset from those
experiments (research.training_data: held-out questions never included), trains, and follows the run:
steps done of total, the last loss, a log, and a heartbeat (`progress_at`). A version is registered
only when training succeeded, in the same transaction that marks the run done, and never for a run
that failed (research.generator_training for the generator; research.reward_training for the stance head).

A worker that dies mid-run leaves its run `running`: `training_runs_recover`, which the recovery sweep
(deliberation.recovery) calls by name, marks a run without a heartbeat for CONCORD_TRAINING_STALL_SECONDS
as failed, and `training_run_retry` starts a new run with the same settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts import permissions
from deliberation import dispatch
from deliberation.dispatch import TaskName
from deliberation.models import Arm, Experiment, GeneratorVersion, RewardModelVersion
from deliberation.recovery import heartbeat_thread
from deliberation.services import InvalidInput, ServiceError
from modeling.generator_quality import DEFAULT_N
from modeling.reward.training import load_jsonl
from modeling.training.consensus_data import load_groups
from modeling.training.methods import DPO, SFT, TRAINING_METHODS
from modeling.training.study_data import DEFAULT_MIN_QUALITY, NothingKept, write_jsonl
from modeling.welfare import WELFARE_FUNCTIONS

from . import training_data
from .generator_evaluation import DEFAULT_EVALUATION_DATA, generator_evaluate
from .generator_training import GeneratorTrainingSpec, TrainingError, generator_train
from .models import TrainingRun
from .reward_training import STANCE_HEAD, RewardTrainingError, RewardTrainingSpec, reward_model_train
from .training_selectors import may_evaluate

logger = logging.getLogger(__name__)

# The knobs a researcher may set, with their defaults: data filters, then hyper-parameters.
DEFAULT_PARAMS: dict[str, Any] = {
    "min_quality": DEFAULT_MIN_QUALITY,
    "min_agreement": None,
    "welfare": None,
    "min_margin": 1,
    "epochs": 1,
    "max_steps": None,
    "batch_size": 4,
    "learning_rate": None,
    "beta": 0.1,
    "seed": 0,
}
_POSITIVE_INTS = ("min_margin", "epochs", "max_steps", "batch_size")
_LOG_LIMIT = 100_000  # characters of log kept on the run (the newest)


def _clean_params(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(raw) - set(DEFAULT_PARAMS)
    if unknown:
        raise InvalidInput(f"Unknown training options: {', '.join(sorted(unknown))}.")
    params = {**DEFAULT_PARAMS, **{key: value for key, value in raw.items() if value not in ("", None)}}
    try:
        for key in _POSITIVE_INTS:
            if params[key] is not None:
                params[key] = int(params[key])
                if params[key] < 1:
                    raise InvalidInput(f"{key.replace('_', ' ')} must be at least 1.")
        params["seed"] = int(params["seed"])
        for key in ("min_quality", "min_agreement", "learning_rate", "beta"):
            if params[key] is not None:
                params[key] = float(params[key])
                if not math.isfinite(params[key]) or params[key] < 0:
                    raise InvalidInput(f"{key.replace('_', ' ')} must be a non-negative number.")
    except (TypeError, ValueError):
        raise InvalidInput("Training options must be numbers.") from None
    if params["welfare"] is not None and params["welfare"] not in WELFARE_FUNCTIONS:
        raise InvalidInput(f"Unknown welfare function {params['welfare']!r}.")
    return params


def training_run_start(
    *,
    user: AbstractBaseUser | AnonymousUser,
    kind: str,
    experiments: Sequence[Experiment],
    method: str = "",
    parent: GeneratorVersion | None = None,
    params: dict[str, Any] | None = None,
    retry_of: TrainingRun | None = None,
) -> TrainingRun:
    """Record a training run on the data of `experiments` and queue it; raise ServiceError if it may not run."""
    if kind not in (TrainingRun.Kind.GENERATOR, TrainingRun.Kind.REWARD_MODEL):
        raise InvalidInput("Choose what to train: the generator or the reward model.")
    if not experiments:
        raise InvalidInput("Choose at least one experiment whose data to train on.")
    for experiment in experiments:
        if not permissions.can_change_experiment(user, experiment):
            raise ServiceError(f"Only the owner or an editor of {experiment.name} may train on its data.")
    if kind == TrainingRun.Kind.GENERATOR:
        if method not in TRAINING_METHODS:
            raise InvalidInput(f"Choose a training method: {', '.join(TRAINING_METHODS)}.")
        if method == DPO and parent is not None and parent.method != GeneratorVersion.Method.LORA:
            raise InvalidInput("DPO continues a LoRA adapter; choose a LoRA version as the base, or none.")
    elif method or parent is not None:
        raise InvalidInput("The reward model has no training method or base generator version.")
    cleaned = _clean_params(params or {})
    with transaction.atomic():
        run = TrainingRun.objects.create(
            kind=kind,
            method=method,
            parent=parent,
            params=cleaned,
            requested_by_id=user.pk if user.is_authenticated else None,
            retry_of=retry_of,
        )
        run.experiments.set(experiments)
        transaction.on_commit(lambda: dispatch.enqueue(TaskName.TRAIN_MODEL, args=[run.pk]))
    return run


def _claim(run_id: int) -> TrainingRun | None:
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        # Idempotent: a run that started (or finished) is not started again by a redelivered task.
        if run is None or run.status != TrainingRun.Status.PENDING:
            return None
        run.status = TrainingRun.Status.RUNNING
        run.started_at = run.progress_at = timezone.now()
        run.save(update_fields=["status", "started_at", "progress_at"])
    return run


def training_run_retry(*, user: AbstractBaseUser | AnonymousUser, run: TrainingRun) -> TrainingRun:
    """Start a new run with the settings of failed `run` (same data, method, base and options); the same
    permissions as starting one. The failed run stays as it was, with its error."""
    if run.status != TrainingRun.Status.FAILED:
        raise InvalidInput("Only a failed run can be retried.")
    if run.kind == TrainingRun.Kind.EVALUATION:
        if run.evaluated_version is None:
            raise InvalidInput("The version this run evaluated no longer exists.")
        return generator_evaluation_start(user=user, version=run.evaluated_version, params=dict(run.params), retry_of=run)
    return training_run_start(
        user=user,
        kind=run.kind,
        experiments=list(run.experiments.all()),
        method=run.method,
        parent=run.parent,
        params=dict(run.params),
        retry_of=run,
    )


EVALUATION_DEFAULTS: dict[str, Any] = {"groups": 8, "n": DEFAULT_N, "seed": 0}


def generator_evaluation_start(
    *,
    user: AbstractBaseUser | AnonymousUser,
    version: GeneratorVersion,
    params: dict[str, Any] | None = None,
    retry_of: TrainingRun | None = None,
) -> TrainingRun:
    """Record an evaluation of `version` on the dev groups (evaluate_generator's report) and queue it."""
    if not may_evaluate(user):
        raise ServiceError("Only a researcher who owns or edits an experiment may start an evaluation.")
    raw = {key: value for key, value in (params or {}).items() if value not in ("", None)}
    unknown = set(raw) - set(EVALUATION_DEFAULTS)
    if unknown:
        raise InvalidInput(f"Unknown evaluation options: {', '.join(sorted(unknown))}.")
    try:
        cleaned = {key: int(value) for key, value in {**EVALUATION_DEFAULTS, **raw}.items()}
    except (TypeError, ValueError):
        raise InvalidInput("Evaluation options must be whole numbers.") from None
    if cleaned["groups"] < 1 or cleaned["n"] < 1:
        raise InvalidInput("Evaluate at least one group, with at least one candidate each.")
    with transaction.atomic():
        run = TrainingRun.objects.create(
            kind=TrainingRun.Kind.EVALUATION,
            evaluated_version=version,
            params=cleaned,
            requested_by_id=user.pk if user.is_authenticated else None,
            retry_of=retry_of,
        )
        transaction.on_commit(lambda: dispatch.enqueue(TaskName.TRAIN_MODEL, args=[run.pk]))
    return run


class RunStopped(Exception):
    """The run is no longer running (the sweep took it for lost): its worker stops and registers nothing."""


def _still_running(run_id: int, **fields: Any) -> None:
    """Record a sign of life (and `fields`) on a running run; raise RunStopped if it no longer runs."""
    if not TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(progress_at=timezone.now(), **fields):
        raise RunStopped("The run was marked failed while it trained (no progress for too long); nothing was registered.")


def heartbeat(*, run_id: int) -> contextlib.AbstractContextManager[None]:
    """While the block runs, mark the run alive every third of the stall time, so that a step or a model
    load longer than that is not taken for a dead worker."""
    return heartbeat_thread(
        beat=lambda: TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(progress_at=timezone.now()),
        interval=max(1.0, settings.CONCORD_TRAINING_STALL_SECONDS / 3),
        name=f"training-run-{run_id}",
    )


def training_runs_recover(*, now: datetime | None = None) -> list[int]:
    """Mark failed every running run whose worker showed no sign of life for CONCORD_TRAINING_STALL_SECONDS
    (a worker that died, or was killed, never finishes its run). Returns their ids. Safe from any number of
    sweeping processes at once: each run is rechecked under its lock."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.CONCORD_TRAINING_STALL_SECONDS)
    stalled = (
        TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING)
        .annotate(last_sign=Coalesce("progress_at", "started_at", "created_at"))
        .filter(last_sign__lt=cutoff)
        .values_list("pk", flat=True)
    )
    failed: list[int] = []
    for run_id in list(stalled):
        with transaction.atomic():
            # A row locked by someone else (its worker registering a version right now) is moving: leave it.
            run = TrainingRun.objects.select_for_update(skip_locked=True).filter(pk=run_id).first()
            if run is None or run.status != TrainingRun.Status.RUNNING:
                continue
            last_sign = run.progress_at or run.started_at or run.created_at
            if last_sign >= cutoff:
                continue
            run.status = TrainingRun.Status.FAILED
            run.error = f"The worker stopped: no progress since {last_sign.isoformat(timespec='seconds')}. Retry to start it again."
            run.log = (run.log + "\n" if run.log else "") + f"failed: {run.error}"
            run.finished_at = now
            run.save(update_fields=["status", "error", "log", "finished_at"])
        failed.append(run_id)
    return failed


def sweep_training_runs(now: datetime) -> list[int]:
    """The recovery sweep's check (registered in research.apps): the runs it failed."""
    return training_runs_recover(now=now)


class _Follower:
    """Writes a run's progress and log as it goes (one short UPDATE per step)."""

    def __init__(self, run: TrainingRun) -> None:
        self.run_id = run.pk
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        _still_running(self.run_id, log=self.text())

    def text(self) -> str:
        return "\n".join(self.lines)[-_LOG_LIMIT:]

    def progress(self, step: int, total: int, loss: float) -> None:
        self.lines.append(f"step {step}/{total}  loss {loss:.4f}")
        # Raising here (the run was taken for lost) stops the trainer at this step.
        _still_running(self.run_id, steps_done=step, steps_total=total, loss=loss, log=self.text())

    def finish(self, line: str, **outcome: Any) -> None:
        """Mark the run done with its version: called inside the version's registration transaction, so
        that a run the sweep marked failed meanwhile refuses the version (rolled back, nothing registered)."""
        run = TrainingRun.objects.select_for_update().get(pk=self.run_id)
        if run.status != TrainingRun.Status.RUNNING:
            raise RunStopped("The run was marked failed while it trained (no progress for too long); nothing was registered.")
        self.lines.append(line)
        TrainingRun.objects.filter(pk=self.run_id).update(
            status=TrainingRun.Status.DONE, finished_at=timezone.now(), progress_at=timezone.now(), log=self.text(), **outcome
        )


def _data_dir(run: TrainingRun) -> Path:
    directory = Path(settings.CONCORD_MODEL_STORE) / "training-runs" / str(run.pk)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _train_generator(run: TrainingRun, follow: _Follower) -> None:
    experiments = list(run.experiments.all())
    params = run.params
    if run.method == SFT:
        build = training_data.sft_dataset(
            experiments=experiments, min_quality=params["min_quality"], min_agreement=params["min_agreement"], welfare=params["welfare"]
        )
    else:
        build = training_data.preference_dataset(experiments=experiments, min_margin=params["min_margin"])
    follow.say(build.report())
    data = _data_dir(run) / f"{run.method}.jsonl"
    write_jsonl(build.rows, data)
    TrainingRun.objects.filter(pk=run.pk).update(dataset_path=str(data))
    follow.say(f"{len(build.rows)} rows written to {data}; training ({run.method})")
    spec = GeneratorTrainingSpec(
        method=run.method, data=data, parent=run.parent, name=f"run-{run.pk}-{run.method}",
        epochs=params["epochs"], max_steps=params["max_steps"], learning_rate=params["learning_rate"],
        batch_size=params["batch_size"], seed=params["seed"], beta=params["beta"],
        # One opinion order per statement: a study's rows are many, and each is already one real prompt.
        shuffles=1,
    )

    def registered(version: GeneratorVersion) -> None:
        follow.finish(f"registered generator version {version.name} (adapter sha256 {version.sha256})", generator_version=version)

    generator_train(spec=spec, on_progress=follow.progress, on_registered=registered)


def _train_reward_model(run: TrainingRun, follow: _Follower) -> None:
    rows = training_data.reward_rows(experiments=list(run.experiments.all()))
    if not rows:
        raise NothingKept("No rating with the rater's own opinion on a training question.")
    data = _data_dir(run) / "reward.jsonl"
    write_jsonl(rows, data)
    TrainingRun.objects.filter(pk=run.pk).update(dataset_path=str(data))
    follow.say(f"{len(rows)} rating rows written to {data}; training the stance head")

    def registered(version: RewardModelVersion) -> None:
        follow.finish(f"registered reward model version {version.pk} ({version.kind})", reward_model_version=version)

    # The rows as written, read back the way the command reads --data: one path from file to version.
    reward_model_train(
        rows=load_jsonl(data),
        spec=RewardTrainingSpec(kind=STANCE_HEAD, data_label=str(data), seed=run.params["seed"]),
        on_progress=follow.progress,
        on_log=follow.say,
        on_registered=registered,
    )


class EvaluationFailed(Exception):
    """Generation failed for some groups: the run fails, with the report (the per-group errors) kept."""


def _evaluate_generator(run: TrainingRun, follow: _Follower) -> None:
    version = run.evaluated_version
    if version is None:
        raise EvaluationFailed("The version to evaluate no longer exists.")
    groups = load_groups(DEFAULT_EVALUATION_DATA)[: run.params["groups"]]
    TrainingRun.objects.filter(pk=run.pk).update(dataset_path=str(DEFAULT_EVALUATION_DATA))
    report = generator_evaluate(
        groups=groups,
        data=DEFAULT_EVALUATION_DATA,
        n=run.params["n"],
        seed=run.params["seed"],
        max_new_tokens=settings.CONCORD_MAX_NEW_TOKENS,
        backend=settings.CONCORD_GENERATOR_BACKEND,
        version=version,
        on_progress=follow.say,
    )
    failed = sum(evaluated["summary"]["groups_failed"] for evaluated in report["runs"])
    if failed:
        TrainingRun.objects.filter(pk=run.pk).update(report=report)
        raise EvaluationFailed(f"Generation failed for {failed} group(s); see the report's per-group errors.")
    with transaction.atomic():
        follow.finish(f"evaluated {version.name} on {len(groups)} dev groups", report=report)


def training_run_execute(*, run_id: int) -> str:
    """Run a pending training run to the end: its status says how it went. Returns that status."""
    run = _claim(run_id)
    if run is None:
        return "skipped"
    follow = _Follower(run)
    try:
        with heartbeat(run_id=run.pk):
            if run.kind == TrainingRun.Kind.GENERATOR:
                _train_generator(run, follow)
            elif run.kind == TrainingRun.Kind.EVALUATION:
                _evaluate_generator(run, follow)
            else:
                _train_reward_model(run, follow)
    except Exception as error:  # the run records any failure; the version is registered only on success
        known = (NothingKept, TrainingError, RewardTrainingError, RunStopped, EvaluationFailed)
        message = str(error) if isinstance(error, known) else f"{type(error).__name__}: {error}"
        follow.lines.append(f"failed: {message}")
        # A run the sweep already marked failed keeps the sweep's error (it says when the worker went quiet).
        TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
            status=TrainingRun.Status.FAILED, error=message, log=follow.text(), finished_at=timezone.now()
        )
        return TrainingRun.Status.FAILED
    return TrainingRun.Status.DONE


def arm_generator_version_set(*, user: AbstractBaseUser | AnonymousUser, arm: Arm, version: GeneratorVersion | None) -> Arm:
    """Point an arm at a generator version (None: the site default); owner or editor only."""
    if not permissions.can_change_experiment(user, arm.experiment):
        raise ServiceError("Only the owner or an editor may change this experiment's arms.")
    with transaction.atomic():
        arm = Arm.objects.select_for_update().get(pk=arm.pk)
        arm.generator_version = version
        arm.save(update_fields=["generator_version"])
    return arm

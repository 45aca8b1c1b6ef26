"""Training from the product: a researcher starts a run on the researcher pages, a task runs it.

`training_run_start` checks the request (the researcher must be the owner or an editor of every
experiment whose data it uses; accounts.permissions), records a TrainingRun and queues
`research.tasks.train_model` by name (the `training` queue under Celery; in-process, off the request
path, in the embedded default). `training_run_execute` (the task's body) builds the dataset from those
experiments (research.training_data: held-out questions never included), trains, and follows the run:
steps done of total, the last loss, a log. A version is registered only when training succeeded
(research.generator_training for the generator; train_reward_model for the stance head).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from accounts import permissions
from deliberation import dispatch
from deliberation.dispatch import TaskName
from deliberation.models import Arm, Experiment, GeneratorVersion, RewardModelVersion
from deliberation.services import InvalidInput, ServiceError
from modeling.training.methods import DPO, SFT, TRAINING_METHODS
from modeling.training.study_data import DEFAULT_MIN_QUALITY, NothingKept, write_jsonl
from modeling.welfare import WELFARE_FUNCTIONS

from . import training_data
from .generator_training import GeneratorTrainingSpec, TrainingError, generator_train
from .models import TrainingRun

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
) -> TrainingRun:
    """Record a training run on the data of `experiments` and queue it; raise ServiceError if it may not run."""
    if kind not in TrainingRun.Kind.values:
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
            kind=kind, method=method, parent=parent, params=cleaned, requested_by_id=user.pk if user.is_authenticated else None
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
        run.started_at = timezone.now()
        run.save(update_fields=["status", "started_at"])
    return run


class _Follower:
    """Writes a run's progress and log as it goes (one short UPDATE per step)."""

    def __init__(self, run: TrainingRun) -> None:
        self.run_id = run.pk
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        TrainingRun.objects.filter(pk=self.run_id).update(log=self.text())

    def text(self) -> str:
        return "\n".join(self.lines)[-_LOG_LIMIT:]

    def progress(self, step: int, total: int, loss: float) -> None:
        self.lines.append(f"step {step}/{total}  loss {loss:.4f}")
        TrainingRun.objects.filter(pk=self.run_id).update(steps_done=step, steps_total=total, loss=loss, log=self.text())


def _data_dir(run: TrainingRun) -> Path:
    directory = Path(settings.CONCORD_MODEL_STORE) / "training-runs" / str(run.pk)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _train_generator(run: TrainingRun, follow: _Follower) -> GeneratorVersion:
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
    trained = generator_train(spec=spec, on_progress=follow.progress)
    follow.say(f"registered generator version {trained.version.name} (adapter sha256 {trained.version.sha256})")
    return trained.version


def _train_reward_model(run: TrainingRun, follow: _Follower) -> RewardModelVersion:
    rows = training_data.reward_rows(experiments=list(run.experiments.all()))
    if not rows:
        raise NothingKept("No rating with the rater's own opinion on a training question.")
    data = _data_dir(run) / "reward.jsonl"
    write_jsonl(rows, data)
    TrainingRun.objects.filter(pk=run.pk).update(dataset_path=str(data), steps_total=1)
    follow.say(f"{len(rows)} rating rows written to {data}; training the stance head")
    out = StringIO()
    # The command is the one place the stance head is trained and registered.
    call_command("train_reward_model", "--kind", "stance-head", "--data", str(data), "--seed", str(run.params["seed"]), stdout=out, stderr=out)
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    version = RewardModelVersion.objects.get(pk=report["version"])
    TrainingRun.objects.filter(pk=run.pk).update(steps_done=1)
    follow.say(f"registered reward model version {version.pk}")
    return version


def training_run_execute(*, run_id: int) -> str:
    """Run a pending training run to the end: its status says how it went. Returns that status."""
    run = _claim(run_id)
    if run is None:
        return "skipped"
    follow = _Follower(run)
    fields: dict[str, Any] = {}
    try:
        if run.kind == TrainingRun.Kind.GENERATOR:
            fields["generator_version"] = _train_generator(run, follow)
        else:
            fields["reward_model_version"] = _train_reward_model(run, follow)
    except Exception as error:  # the run records any failure; the version is registered only on success
        message = str(error) if isinstance(error, (NothingKept, TrainingError)) else f"{type(error).__name__}: {error}"
        follow.say(f"failed: {message}")
        TrainingRun.objects.filter(pk=run.pk).update(
            status=TrainingRun.Status.FAILED, error=message, log=follow.text(), finished_at=timezone.now()
        )
        return TrainingRun.Status.FAILED
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.DONE, finished_at=timezone.now(), log=follow.text(), **fields)
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

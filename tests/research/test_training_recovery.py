"""Training runs whose worker died, runs waiting for a worker, and retries (research.training).

A running run beats (progress_at); the recovery sweep (deliberation.recovery, which calls research's
check by name) marks a run without a beat for CONCORD_TRAINING_STALL_SECONDS as failed; its worker, if it
was only slow, stops at its next step and registers nothing; the researcher retries it from the run page.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import Collaboration
from deliberation import dispatch, recovery
from deliberation.models import GeneratorVersion, Rating, RewardModelVersion
from modeling.reward.training import rows_from_mappings
from research import reward_training, training
from research.models import TrainingRun
from tests.factories import UserFactory
from tests.research.study import StudyFixture, build_study

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(researcher) -> StudyFixture:
    return build_study(owner=researcher)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    """What the services hand to dispatch.enqueue (after commit), instead of a broker."""
    calls: list[tuple[str, list[Any]]] = []

    def enqueue(name: str, *, args: list[Any], countdown: float = 0.0) -> bool:
        calls.append((str(name), args))
        return True

    monkeypatch.setattr("deliberation.dispatch.enqueue", enqueue)
    return calls


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _run(study: StudyFixture, **fields: Any) -> TrainingRun:
    params = {**training.DEFAULT_PARAMS, "max_steps": 3, "min_quality": 4.0}
    run = TrainingRun.objects.create(kind=TrainingRun.Kind.GENERATOR, method="sft", params=params, **fields)
    run.experiments.set([study.experiment])
    return run


def test_the_sweep_fails_a_run_whose_worker_went_quiet_and_only_that_one(study: StudyFixture, settings, monkeypatch) -> None:
    settings.CONCORD_TRAINING_STALL_SECONDS = 600
    # The sweep closes stale connections around its work; the test's connection holds its transaction.
    monkeypatch.setattr(recovery, "close_old_connections", lambda: None)
    now = timezone.now()
    quiet_since = now - timedelta(seconds=601)
    dead = _run(study, status=TrainingRun.Status.RUNNING, started_at=quiet_since - timedelta(hours=1), progress_at=quiet_since)
    alive = _run(study, status=TrainingRun.Status.RUNNING, started_at=now - timedelta(hours=2), progress_at=now - timedelta(seconds=30))
    pending = _run(study)
    TrainingRun.objects.filter(pk=pending.pk).update(created_at=now - timedelta(days=1))  # waiting for a worker is not stalling
    # research registered its check with the sweep (research.apps); the sweep runs it beside the rooms' recovery.
    assert "training_runs" in recovery.registered_checks()
    report = recovery.sweep_once()
    assert report is not None and report.checks == {"training_runs": [dead.pk]}
    dead.refresh_from_db()
    assert dead.status == TrainingRun.Status.FAILED and dead.finished_at is not None
    assert dead.error.startswith(f"The worker stopped: no progress since {quiet_since.isoformat(timespec='seconds')}")
    assert dead.generator_version is None and "failed: The worker stopped" in dead.log
    for run in (alive, pending):
        run.refresh_from_db()
    assert alive.status == TrainingRun.Status.RUNNING and pending.status == TrainingRun.Status.PENDING
    # Idempotent: a second sweep finds nothing more to do.
    assert not recovery.sweep_once()


def test_a_worker_taken_for_lost_stops_and_registers_nothing(study: StudyFixture, settings, monkeypatch, tmp_path: Path) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path
    run = _run(study)
    real_rows = training.training_data.sft_dataset

    def slow_worker(**kwargs: Any) -> Any:
        # While this worker builds its data, another process's sweep sees no beat for longer than the stall time.
        rows = real_rows(**kwargs)
        assert rows.rows  # there is data to train on: only the sweep stops this run
        later = timezone.now() + timedelta(seconds=settings.CONCORD_TRAINING_STALL_SECONDS + 1)
        assert training.training_runs_recover(now=later) == [run.pk]
        return rows

    monkeypatch.setattr(training.training_data, "sft_dataset", slow_worker)
    assert training.training_run_execute(run_id=run.pk) == TrainingRun.Status.FAILED
    run.refresh_from_db()
    # The sweep's error stays (it says when the worker went quiet); the worker stopped before training.
    assert run.status == TrainingRun.Status.FAILED and run.error.startswith("The worker stopped: no progress since")
    assert not GeneratorVersion.objects.exists() and run.generator_version is None
    assert run.dataset_path == "" and not any(tmp_path.rglob("*.jsonl"))  # it stopped at its next sign of life


def test_a_version_is_refused_when_its_run_is_no_longer_running(study: StudyFixture, settings, tmp_path: Path) -> None:
    """The last guard: the run is checked under its lock in the registration's own transaction."""
    settings.CONCORD_MODEL_STORE = tmp_path
    settings.CONCORD_DEVICE = "cpu"
    rows = rows_from_mappings(training.training_data.reward_rows(experiments=[study.experiment]), source="rating")

    def refuse(version: RewardModelVersion) -> None:
        raise training.RunStopped("the run was marked failed")

    seen: list[tuple[int, int, float]] = []
    with pytest.raises(training.RunStopped):
        reward_training.reward_model_train(
            rows=rows,
            spec=reward_training.RewardTrainingSpec(kind=reward_training.STANCE_HEAD, epochs=20),
            on_progress=lambda step, total, loss: seen.append((step, total, loss)),
            on_registered=refuse,
        )
    assert not RewardModelVersion.objects.exists()
    assert not any((tmp_path / "reward").iterdir())  # the weights no version names were removed
    assert [step for step, _, _ in seen] == list(range(1, 21)) and all(total == 20 for _, total, _ in seen)


def test_a_failed_run_is_retried_with_the_same_settings_by_whoever_may_train(
    study: StudyFixture, researcher, outsider_researcher, enqueued, django_capture_on_commit_callbacks
) -> None:
    parent = GeneratorVersion.objects.create(name="v0", base_model="smollm2-135m-instruct", path="/nowhere", sha256="0" * 64)
    failed = _run(study, status=TrainingRun.Status.FAILED, error="The worker stopped: no progress since ...", parent=parent)
    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=study.experiment, user=viewer, role=Collaboration.Role.VIEWER)
    url = reverse("training_run_retry", args=[failed.pk])

    # A viewer follows the run but may not train on its data: no Retry button, and the action is refused.
    page = _logged_in(viewer).get(reverse("training_run", args=[failed.pk])).content.decode()
    assert "The worker stopped" in page and url not in page
    response = _logged_in(viewer).post(url, follow=True)
    assert "Only the owner or an editor" in response.content.decode()
    # An outsider does not see the run at all.
    assert _logged_in(outsider_researcher).post(url).status_code == 404
    assert TrainingRun.objects.count() == 1 and not enqueued

    owner = _logged_in(researcher)
    assert url in owner.get(reverse("training_run", args=[failed.pk])).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = owner.post(url)
    retry = TrainingRun.objects.exclude(pk=failed.pk).get()
    assert response.status_code == 302 and response["Location"] == reverse("training_run", args=[retry.pk])
    assert enqueued == [(dispatch.TaskName.TRAIN_MODEL, [retry.pk])]
    assert (retry.kind, retry.method, retry.parent, retry.params, retry.retry_of) == (
        failed.kind, failed.method, parent, failed.params, failed,
    )
    assert list(retry.experiments.all()) == [study.experiment] and retry.status == TrainingRun.Status.PENDING
    assert retry.requested_by == researcher
    assert "A retry of run" in owner.get(reverse("training_run", args=[retry.pk])).content.decode()
    # Only a failed run is retried.
    with django_capture_on_commit_callbacks(execute=True):
        response = owner.post(reverse("training_run_retry", args=[retry.pk]), follow=True)
    assert "Only a failed run can be retried" in response.content.decode() and TrainingRun.objects.count() == 2


def test_a_pending_run_says_when_no_training_worker_takes_it(study: StudyFixture, researcher, settings) -> None:
    settings.CONCORD_TRAINING_WORKER_WAIT_SECONDS = 20
    run = _run(study)
    client = _logged_in(researcher)
    url = reverse("training_run", args=[run.pk])
    message = "Waiting for a training worker"
    settings.USE_CELERY = True
    assert message not in client.get(url, headers={"HX-Request": "true"}).content.decode()  # just queued
    TrainingRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(seconds=21))
    page = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert message in page and "celery -A config worker -Q training --pool solo --concurrency 1" in page
    assert 'hx-trigger="every 2s"' in page  # still following: the message goes when a worker takes it
    # In-process (the embedded default) there is no worker to wait for.
    settings.USE_CELERY = False
    assert message not in client.get(url).content.decode()


@pytest.mark.django_db(transaction=True)
def test_in_embedded_mode_the_run_starts_off_the_request_path(study_owner_in_transaction, settings, monkeypatch, tmp_path) -> None:
    researcher, experiment = study_owner_in_transaction
    settings.USE_CELERY = False
    settings.CONCORD_MODEL_STORE = tmp_path
    Rating.objects.update(quality=2)  # nothing to train on: the run fails quickly, once it runs
    may_start = threading.Event()
    ran_on: list[str] = []
    real_claim = training._claim

    def claim_when_allowed(run_id: int) -> TrainingRun | None:
        ran_on.append(threading.current_thread().name)
        assert may_start.wait(timeout=60)
        return real_claim(run_id)

    monkeypatch.setattr(training, "_claim", claim_when_allowed)
    response = _logged_in(researcher).post(
        reverse("training_page"), {"kind": "generator", "method": "sft", "experiments": [experiment.pk], "min_quality": "5"}
    )
    run = TrainingRun.objects.get()
    # The request answered while the task had not even claimed the run: it runs on the in-process runner's thread.
    assert response.status_code == 302 and run.status == TrainingRun.Status.PENDING
    may_start.set()
    deadline = time.monotonic() + 60
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.05)
        run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "No statement was kept" in run.error
    assert ran_on and ran_on[0] != threading.current_thread().name


@pytest.fixture
def study_owner_in_transaction(researcher) -> tuple[Any, Any]:
    study = build_study(owner=researcher, slug="embedded-study")
    return researcher, study.experiment

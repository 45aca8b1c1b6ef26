"""The training pages: a researcher starts a run on their own study's data, the task runs it on the
training queue, the run page follows it; permissions as everywhere (accounts.permissions).

The successful path, with the real model training and generating, is tests/research/test_flywheel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

from accounts.models import Collaboration
from deliberation import dispatch
from deliberation.models import GeneratorVersion, Rating
from modeling.training.reward_head import HeadConfig
from research.models import TrainingRun
from research.tasks import train_model
from tests.factories import UserFactory
from tests.research.study import StudyFixture, build_study

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(researcher) -> StudyFixture:
    return build_study(owner=researcher)


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def run_tasks_now(monkeypatch, django_capture_on_commit_callbacks):
    """Queued tasks run when the request's transaction commits, as the embedded runner would run them."""
    queued: list[tuple[str, list]] = []

    def enqueue(name, *, args, countdown=0.0):
        queued.append((str(name), args))
        dispatch.task_named(name).apply(args=args)
        return True

    monkeypatch.setattr("deliberation.dispatch.enqueue", enqueue)
    return queued


def test_training_is_routed_to_its_own_queue() -> None:
    assert django_settings.CELERY_TASK_ROUTES[dispatch.TaskName.TRAIN_MODEL] == {"queue": "training"}


def test_a_run_with_no_usable_data_fails_visibly_and_registers_nothing(
    study: StudyFixture, researcher, run_tasks_now, django_capture_on_commit_callbacks, settings, tmp_path: Path
) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path
    Rating.objects.update(quality=2)  # nothing reaches the default quality bar
    client = _logged_in(researcher)
    assert client.get(reverse("training_page")).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("training_page"),
            {"kind": "generator", "method": "sft", "experiments": [study.experiment.pk], "min_quality": "5", "max_steps": "2"},
        )
    run = TrainingRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("training_run", args=[run.pk])
    assert run_tasks_now == [(dispatch.TaskName.TRAIN_MODEL, [run.pk])]
    assert run.status == TrainingRun.Status.FAILED and "No statement was kept" in run.error
    assert "mean quality >= 5" in run.log and run.generator_version is None
    assert not GeneratorVersion.objects.exists()
    page = client.get(reverse("training_run", args=[run.pk]))
    assert page.status_code == 200 and "No statement was kept" in page.content.decode()
    # A redelivered task does not start a finished run again.
    assert train_model.apply(args=[run.pk]).get() == "skipped"


def test_only_owners_and_editors_train_on_a_studys_data(study: StudyFixture, outsider_researcher, run_tasks_now) -> None:
    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=study.experiment, user=viewer, role=Collaboration.Role.VIEWER)
    for user in (outsider_researcher, viewer):
        response = _logged_in(user).post(
            reverse("training_page"), {"kind": "generator", "method": "sft", "experiments": [study.experiment.pk]}
        )
        assert response.status_code == 403
    assert not TrainingRun.objects.exists()
    # The outsider cannot follow the owner's run either.
    run = TrainingRun.objects.create(kind=TrainingRun.Kind.GENERATOR, method="sft")
    run.experiments.set([study.experiment])
    assert _logged_in(outsider_researcher).get(reverse("training_run", args=[run.pk])).status_code == 404
    assert _logged_in(viewer).get(reverse("training_run", args=[run.pk])).status_code == 200


def test_bad_options_are_refused_before_anything_runs(study: StudyFixture, researcher, run_tasks_now) -> None:
    client = _logged_in(researcher)
    for data, message in (
        ({"kind": "generator", "method": "ppo"}, "Choose a training method"),
        ({"kind": "generator", "method": "sft", "max_steps": "0"}, "max steps must be at least 1"),
        ({"kind": "generator", "method": "sft", "welfare": "plurality"}, "Unknown welfare function"),
    ):
        response = client.post(reverse("training_page"), {**data, "experiments": [study.experiment.pk]}, follow=True)
        assert message in response.content.decode()
    response = client.post(reverse("training_page"), {"kind": "generator", "method": "sft"}, follow=True)
    assert "Choose at least one experiment" in response.content.decode()
    assert not TrainingRun.objects.exists() and not run_tasks_now


def test_an_arm_is_pointed_at_a_version_by_its_owner_only(study: StudyFixture, researcher, outsider_researcher) -> None:
    version = GeneratorVersion.objects.create(name="v1", base_model="smollm2-135m-instruct", path="/nowhere", sha256="0" * 64)
    arm = study.arms["base"]
    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=study.experiment, user=viewer, role=Collaboration.Role.VIEWER)
    url = reverse("arm_generator_version", args=[arm.pk])
    assert _logged_in(outsider_researcher).post(url, {"version": version.pk}).status_code == 404
    assert _logged_in(viewer).post(url, {"version": version.pk}).status_code == 403
    arm.refresh_from_db()
    assert arm.generator_version is None
    owner = _logged_in(researcher)
    assert owner.post(url, {"version": version.pk}).status_code == 302
    arm.refresh_from_db()
    assert arm.generator_version == version
    page = owner.get(reverse("versions_page")).content.decode()
    assert f"arm {study.experiment.slug}/{arm.name}" in page
    # The outsider sees the version but not which of the owner's arms use it.
    assert f"arm {study.experiment.slug}/" not in _logged_in(outsider_researcher).get(reverse("versions_page")).content.decode()


def test_a_reward_model_run_trains_the_stance_head_on_the_studys_ratings(
    study: StudyFixture, researcher, run_tasks_now, django_capture_on_commit_callbacks, settings, tmp_path: Path
) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path
    settings.CONCORD_DEVICE = "cpu"
    client = _logged_in(researcher)
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("training_page"), {"kind": "reward_model", "experiments": [study.experiment.pk]})
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.DONE, run.error + run.log
    version = run.reward_model_version
    assert version is not None and version.kind == "stance-head" and Path(version.path).is_dir()
    rows = Path(run.dataset_path).read_text(encoding="utf-8").splitlines()
    # One row per rating whose rater wrote an opinion in that round: every rating of this study.
    assert len(rows) == Rating.objects.count() and version.params["data"] == run.dataset_path
    # Progress is reported epoch by epoch (research.reward_training), like a generator's steps.
    assert run.steps_done == run.steps_total == HeadConfig().epochs and run.loss is not None and run.progress_at is not None
    assert f"step {HeadConfig().epochs}/{HeadConfig().epochs}" in run.log
    assert f"registered reward model version {version.pk} (stance-head)" in run.log
    assert not GeneratorVersion.objects.exists()

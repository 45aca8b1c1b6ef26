"""Evaluating a generator version from the versions page: evaluate_generator's report (research.generator_evaluation)
run as a job on the training queue, followed on the run page and linked from the version's row.

The generator is the stand-in here (tests/conftest.py); the reward model that ranks its candidates is real.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from deliberation import dispatch
from deliberation.models import GeneratorVersion
from research.models import TrainingRun
from tests.factories import UserFactory
from tests.research.study import StudyFixture, build_study

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(researcher) -> StudyFixture:
    return build_study(owner=researcher)


@pytest.fixture
def run_tasks_now(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    """Queued tasks run when the request's transaction commits, as the embedded runner would run them."""
    queued: list[tuple[str, list[Any]]] = []

    def enqueue(name: str, *, args: list[Any], countdown: float = 0.0) -> bool:
        queued.append((str(name), args))
        dispatch.task_named(name).apply(args=args)
        return True

    monkeypatch.setattr("deliberation.dispatch.enqueue", enqueue)
    return queued


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_researcher_evaluates_a_version_from_the_versions_page(
    study: StudyFixture, researcher, run_tasks_now, django_capture_on_commit_callbacks
) -> None:
    version = GeneratorVersion.objects.create(name="v1", base_model="smollm2-135m-instruct", path="/nowhere", sha256="0" * 64)
    client = _logged_in(researcher)
    evaluate_url = reverse("version_evaluate", args=[version.pk])
    page = client.get(reverse("versions_page")).content.decode()
    assert "(not evaluated)" in page and evaluate_url in page

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(evaluate_url, {"groups": "2"})
    run = TrainingRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("training_run", args=[run.pk])
    assert run_tasks_now == [(dispatch.TaskName.TRAIN_MODEL, [run.pk])]
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.DONE, run.error + run.log
    assert run.kind == TrainingRun.Kind.EVALUATION and run.evaluated_version == version and run.params["groups"] == 2
    # evaluate_generator's report: the version's run over two dev groups, every candidate checked.
    assert run.report["data"]["groups"] == 2 and [evaluated["label"] for evaluated in run.report["runs"]] == ["v1"]
    summary = run.report["runs"][0]["summary"]
    assert summary["groups_failed"] == 0 and 0 <= summary["usable_rate"] <= 1
    assert "[v1] group 2/2" in run.log and "evaluated v1 on 2 dev groups" in run.log

    run_page = client.get(reverse("training_run", args=[run.pk])).content.decode()
    assert "Evaluates <strong>v1</strong>" in run_page and 'data-label="v1"' in run_page
    versions = client.get(reverse("versions_page")).content.decode()
    assert f'href="{reverse("training_run", args=[run.pk])}">evaluation {run.pk}</a>' in versions
    assert f"v1: {summary['usable_rate']:.2f} usable" in versions and "(not evaluated)" not in versions
    assert "Evaluation of a generator version: v1" in client.get(reverse("training_page")).content.decode()


def test_only_researchers_who_run_studies_start_evaluations(study: StudyFixture, researcher, run_tasks_now) -> None:
    version = GeneratorVersion.objects.create(name="v1", base_model="smollm2-135m-instruct", path="/nowhere", sha256="0" * 64)
    bystander = UserFactory(username="bystander")  # owns and edits no experiment
    url = reverse("version_evaluate", args=[version.pk])
    assert url not in _logged_in(bystander).get(reverse("versions_page")).content.decode()
    response = _logged_in(bystander).post(url, follow=True)
    assert "Only a researcher who owns or edits an experiment" in response.content.decode()
    assert _logged_in(researcher).post(reverse("version_evaluate", args=[version.pk + 99])).status_code == 404
    response = _logged_in(researcher).post(url, {"groups": "0"}, follow=True)
    assert "at least one group" in response.content.decode()
    assert not TrainingRun.objects.exists() and not run_tasks_now

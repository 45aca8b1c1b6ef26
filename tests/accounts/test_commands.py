"""Management commands that touch an experiment apply accounts.permissions, as the researcher pages do (issue 12)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import Collaboration
from deliberation.models import Experiment
from research.models import DatasetExport
from tests.factories import ExperimentFactory, UserFactory
from tests.research.test_questions import HM_BANK

pytestmark = pytest.mark.django_db


def _export(experiment: Experiment, out: Path, *extra: str) -> None:
    call_command("export_dataset", "--experiment", experiment.slug, "--format", "csv", "--out", str(out), *extra, stdout=StringIO())


def test_export_dataset_needs_a_user_who_may_change_the_experiment(group, tmp_path: Path) -> None:
    experiment = group[0].participant.room.experiment
    staff = UserFactory(username="staff-other", is_staff=True)
    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=experiment, user=viewer, role=Collaboration.Role.VIEWER)

    with pytest.raises(CommandError, match="--as-user"):
        _export(experiment, tmp_path / "nobody", "--include-external-ids")
    with pytest.raises(CommandError, match="may not change"):
        _export(experiment, tmp_path / "staff", "--include-external-ids", "--as-user", staff.username)
    with pytest.raises(CommandError, match="may not change"):
        _export(experiment, tmp_path / "viewer", "--include-external-ids", "--as-user", viewer.username)
    with pytest.raises(CommandError, match="No active user"):
        _export(experiment, tmp_path / "ghost", "--as-user", "ghost")
    assert not DatasetExport.objects.exists()
    assert not any(tmp_path.rglob("*.zip"))


@pytest.mark.parametrize("who", ["owner", "editor", "superuser"])
def test_the_owner_an_editor_or_a_superuser_exports_and_is_recorded(group, tmp_path: Path, who: str) -> None:
    experiment = group[0].participant.room.experiment
    if who == "owner":
        user = experiment.owner
    elif who == "editor":
        user = UserFactory(username="editor")
        Collaboration.objects.create(experiment=experiment, user=user, role=Collaboration.Role.EDITOR)
    else:
        user = UserFactory(username="root", is_superuser=True)
    _export(experiment, tmp_path, "--include-external-ids", "--as-user", user.username)
    export = DatasetExport.objects.get()
    assert export.status == DatasetExport.Status.DONE and export.requested_by == user and export.requested_via == "command"
    assert Path(export.path).exists()


def test_import_questions_attaches_only_to_an_experiment_the_user_may_change(researcher) -> None:
    theirs = ExperimentFactory(slug="theirs")
    attached_before = theirs.questions.count()
    with pytest.raises(CommandError, match="may not change"):
        call_command("import_questions", str(HM_BANK), "--split", "ood_test", "--experiment", theirs.slug, "--as-user", researcher.username, stdout=StringIO())
    with pytest.raises(CommandError, match="--as-user"):
        call_command("import_questions", str(HM_BANK), "--split", "ood_test", "--experiment", theirs.slug, stdout=StringIO())
    assert theirs.questions.count() == attached_before
    mine = ExperimentFactory(slug="mine", owner=researcher)
    mine_before = mine.questions.count()
    call_command("import_questions", str(HM_BANK), "--split", "ood_test", "--experiment", mine.slug, "--as-user", researcher.username, stdout=StringIO())
    assert mine.questions.count() > mine_before
    # The bank alone touches no experiment: no user needed.
    call_command("import_questions", str(HM_BANK), "--split", "ood_test", stdout=StringIO())


def test_simulate_cohort_fills_only_an_experiment_the_user_may_change(researcher) -> None:
    theirs = ExperimentFactory(slug="their-pilot")
    with pytest.raises(CommandError, match="may not change"):
        call_command("simulate_cohort", "--experiment", theirs.slug, "--as-user", researcher.username)
    assert not theirs.rooms.exists()


def test_seed_demo_does_not_take_over_someone_elses_demo() -> None:
    ExperimentFactory(slug="demo", owner=UserFactory(username="alice"))
    UserFactory(username="mallory")  # exists, not a superuser
    with pytest.raises(CommandError, match="may not change the existing demo"):
        call_command("seed_demo", "--username", "mallory", stdout=StringIO())
    assert not Experiment.objects.get(slug="demo").allow_several_seats_per_browser

"""The permission rule (accounts.permissions), tried as an attacker would: a staff researcher who is not
a superuser, a viewer who tries to change, an editor, and the admin's lists and foreign-key choices."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from accounts.models import Collaboration
from deliberation import services
from deliberation.models import Arm, Experiment
from research.models import DatasetExport
from tests.factories import ExperimentFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=False)


@pytest.fixture
def victim_study(researcher) -> Experiment:
    return ExperimentFactory(owner=researcher, slug="victim", name="Victim study")


@pytest.fixture
def staff_attacker(db):
    """A staff researcher (so admitted to the admin, with the model permissions a researcher gets) who is not a superuser."""
    user = UserFactory(username="staff-attacker", is_staff=True)
    codenames = ["view_experiment", "change_experiment", "add_arm", "view_arm", "change_arm", "view_datasetexport", "view_room"]
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    ExperimentFactory(owner=user, slug="attackers-own")
    return user


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _export(experiment: Experiment, tmp_path, *, external_ids: bool) -> DatasetExport:
    path = tmp_path / f"export-{external_ids}.zip"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return DatasetExport.objects.create(
        experiment=experiment, requested_via="web", format="csv", include_external_ids=external_ids,
        out_dir=str(tmp_path), status=DatasetExport.Status.DONE, path=str(path),
    )


def test_staff_alone_sees_and_controls_no_one_elses_experiment(victim_study, staff_attacker, tmp_path) -> None:
    client = _logged_in(staff_attacker)
    home = client.get("/researcher/").content.decode()
    assert "/researcher/experiments/attackers-own/" in home and "/researcher/experiments/victim/" not in home
    for page in ("", "cohort/", "analytics/", "analytics.csv", "exports/"):
        assert client.get(f"/researcher/experiments/victim/{page}").status_code == 404, page
    assert client.post("/researcher/experiments/victim/pause/", {"action": "pause"}).status_code == 404
    assert Experiment.objects.get(pk=victim_study.pk).status == Experiment.Status.ACTIVE
    assert client.post("/researcher/experiments/victim/exports/", {"format": "csv", "include_external_ids": "yes"}).status_code == 404
    export = _export(victim_study, tmp_path, external_ids=True)
    assert client.get(f"/researcher/exports/{export.pk}/download/").status_code == 404
    room = services.participant_join(experiment=victim_study).room
    assert client.get(reverse("room_monitor", args=[room.pk])).status_code == 404
    assert client.get(reverse("room_monitor", args=[room.pk + 1000])).status_code == 404  # the same answer as a missing room


def test_the_admin_lists_and_offers_only_the_researchers_own_experiments(victim_study, staff_attacker) -> None:
    client = _logged_in(staff_attacker)
    listing = client.get("/admin/deliberation/experiment/").content.decode()
    assert "attackers-own" in listing and "Victim study" not in listing and "victim" not in listing
    assert client.get(f"/admin/deliberation/experiment/{victim_study.pk}/change/").status_code in (302, 404)
    assert "Victim study" not in client.get("/admin/deliberation/arm/").content.decode()
    add_form = client.get("/admin/deliberation/arm/add/")
    choices = add_form.context["adminform"].form.fields["experiment"].queryset
    assert list(choices.values_list("slug", flat=True)) == ["attackers-own"]
    arms_before = victim_study.arms.count()
    response = client.post("/admin/deliberation/arm/add/", {
        "experiment": victim_study.pk, "name": "planted", "welfare_method": "utilitarian", "welfare_alpha": 1.0,
        "welfare_tie_break": Arm._meta.get_field("welfare_tie_break").default, "n_candidates": 4, "k_shown": 2, "weight": 1,
    })
    assert response.status_code == 200 and "experiment" in response.context["adminform"].form.errors
    assert victim_study.arms.count() == arms_before


def test_a_viewer_sees_but_cannot_change_or_take_external_ids(victim_study, outsider_researcher, tmp_path) -> None:
    Collaboration.objects.create(experiment=victim_study, user=outsider_researcher, role=Collaboration.Role.VIEWER)
    client = _logged_in(outsider_researcher)
    assert "/researcher/experiments/victim/" in client.get("/researcher/").content.decode()
    for page in ("", "cohort/", "analytics/", "analytics.csv", "exports/"):
        assert client.get(f"/researcher/experiments/victim/{page}").status_code == 200, page
    assert client.post("/researcher/experiments/victim/pause/", {"action": "pause"}).status_code == 403
    assert Experiment.objects.get(pk=victim_study.pk).status == Experiment.Status.ACTIVE
    assert client.post("/researcher/experiments/victim/exports/", {"format": "csv", "include_external_ids": "yes"}).status_code == 403
    assert not DatasetExport.objects.exists()
    pseudonymised, identified = _export(victim_study, tmp_path, external_ids=False), _export(victim_study, tmp_path, external_ids=True)
    assert client.get(f"/researcher/exports/{pseudonymised.pk}/download/").status_code == 200
    assert client.get(f"/researcher/exports/{identified.pk}/download/").status_code == 403
    room = services.participant_join(experiment=victim_study).room
    assert client.get(reverse("room_monitor", args=[room.pk])).status_code == 200
    assert client.post(reverse("room_start", args=[room.pk])).status_code == 403


def test_an_editor_may_pause_and_export_with_external_ids(victim_study, outsider_researcher, tmp_path, settings, monkeypatch) -> None:
    settings.CONCORD_EXPORT_DIR = tmp_path
    monkeypatch.setattr("deliberation.dispatch.enqueue", lambda name, *, args, countdown=0.0: True)
    Collaboration.objects.create(experiment=victim_study, user=outsider_researcher, role=Collaboration.Role.EDITOR)
    client = _logged_in(outsider_researcher)
    assert client.post("/researcher/experiments/victim/pause/", {"action": "pause"}).status_code == 302
    assert Experiment.objects.get(pk=victim_study.pk).status == Experiment.Status.PAUSED
    assert client.post("/researcher/experiments/victim/exports/", {"format": "csv", "include_external_ids": "yes"}).status_code == 302
    assert DatasetExport.objects.get().requested_by == outsider_researcher  # audited
    identified = _export(victim_study, tmp_path, external_ids=True)
    assert client.get(f"/researcher/exports/{identified.pk}/download/").status_code == 200


def test_a_superuser_sees_every_experiment(victim_study) -> None:
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    assert _logged_in(admin).get("/researcher/experiments/victim/").status_code == 200


def test_an_experiment_with_collaborators_is_listed_once(victim_study, researcher) -> None:
    for name in ("a", "b", "c"):
        Collaboration.objects.create(experiment=victim_study, user=UserFactory(username=name))
    assert _logged_in(researcher).get("/researcher/").content.decode().count('href="/researcher/experiments/victim/"') == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_monitor_socket_refuses_staff_who_do_not_share_the_experiment(victim_study, staff_attacker) -> None:
    from tests.deliberation.test_consumers import ORIGIN, _connect, _cookie_for

    room = (await database_sync_to_async(services.participant_join)(experiment=victim_study)).room
    client = Client()
    await database_sync_to_async(client.force_login)(staff_attacker)
    _, connected, code = await _connect(f"/ws/monitor/{room.pk}/", ORIGIN, _cookie_for(client))
    assert not connected and code == 4403


def test_an_editor_cannot_take_ownership_in_the_admin(victim_study, outsider_researcher) -> None:
    Collaboration.objects.create(experiment=victim_study, user=outsider_researcher, role=Collaboration.Role.EDITOR)
    outsider_researcher.is_staff = True
    outsider_researcher.save()
    outsider_researcher.user_permissions.add(*Permission.objects.filter(codename__in=["view_experiment", "change_experiment"]))
    client = _logged_in(outsider_researcher)
    page = client.get(f"/admin/deliberation/experiment/{victim_study.pk}/change/")
    assert page.status_code == 200
    assert "owner" not in page.context["adminform"].form.fields  # shown read-only
    viewer = UserFactory(username="viewer-only", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_experiment", "change_experiment"]))
    Collaboration.objects.create(experiment=victim_study, user=viewer, role=Collaboration.Role.VIEWER)
    # A viewer sees the experiment in the admin but cannot post a change to it.
    assert _logged_in(viewer).get(f"/admin/deliberation/experiment/{victim_study.pk}/change/").status_code == 200
    assert _logged_in(viewer).post(f"/admin/deliberation/experiment/{victim_study.pk}/change/", {"name": "hijacked"}).status_code == 403
    assert Experiment.objects.get(pk=victim_study.pk).name == "Victim study"


def test_admin_sidebar_filters_do_not_name_other_researchers_experiments(victim_study, staff_attacker) -> None:
    """Django's relation filters list every experiment by name; the admin's lists offer only the researcher's own."""
    services.participant_join(experiment=victim_study)
    own = Experiment.objects.get(slug="attackers-own")
    services.participant_join(experiment=own)
    page = _logged_in(staff_attacker).get("/admin/deliberation/room/")
    assert page.status_code == 200
    html = page.content.decode()
    assert str(own) in html
    assert str(victim_study) not in html and f"experiment__id__exact={victim_study.pk}" not in html

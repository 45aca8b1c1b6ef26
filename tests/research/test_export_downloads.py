"""Every download of an export is audited: who, when, from where, with or without external ids (issue 12)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from accounts.models import Collaboration
from research.models import DatasetExport, DatasetExportDownload
from tests.factories import ExperimentFactory, UserFactory

pytestmark = pytest.mark.django_db


def _export(experiment, tmp_path, *, external_ids: bool) -> DatasetExport:
    path = tmp_path / f"export-{experiment.slug}-{external_ids}.zip"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return DatasetExport.objects.create(
        experiment=experiment, requested_via="web", format="csv", include_external_ids=external_ids,
        out_dir=str(tmp_path), status=DatasetExport.Status.DONE, path=str(path),
    )


def _logged_in(user, **extra) -> Client:
    client = Client(**extra)
    client.force_login(user)
    return client


def test_each_download_is_recorded_and_refused_ones_are_not_files(experiment, researcher, outsider_researcher, tmp_path) -> None:
    identified = _export(experiment, tmp_path, external_ids=True)
    owner = _logged_in(researcher, REMOTE_ADDR="203.0.113.7")
    url = f"/researcher/exports/{identified.pk}/download/"
    assert owner.get(url).status_code == 200
    assert owner.get(url).status_code == 200
    assert owner.head(url).status_code == 200  # a HEAD hands over no file, and is not a download
    downloads = list(DatasetExportDownload.objects.order_by("id"))
    assert len(downloads) == 2
    assert all(d.export == identified and d.downloaded_by == researcher and d.include_external_ids for d in downloads)
    assert downloads[0].client_address == "203.0.113.7"

    viewer = UserFactory(username="viewer")
    Collaboration.objects.create(experiment=experiment, user=viewer, role=Collaboration.Role.VIEWER)
    assert _logged_in(viewer).get(url).status_code == 403  # external ids: owner or editor only
    assert _logged_in(outsider_researcher).get(url).status_code == 404
    assert DatasetExportDownload.objects.count() == 2
    pseudonymised = _export(experiment, tmp_path, external_ids=False)
    assert _logged_in(viewer).get(f"/researcher/exports/{pseudonymised.pk}/download/").status_code == 200
    assert DatasetExportDownload.objects.filter(export=pseudonymised, downloaded_by=viewer, include_external_ids=False).count() == 1


def test_the_download_log_in_the_admin_shows_only_the_researchers_own_and_is_read_only(experiment, researcher, tmp_path) -> None:
    other = ExperimentFactory(slug="someone-elses", name="Someone else's")
    _logged_in(researcher).get(f"/researcher/exports/{_export(experiment, tmp_path, external_ids=False).pk}/download/")
    DatasetExportDownload.objects.create(export=_export(other, tmp_path, external_ids=True), downloaded_by=other.owner, include_external_ids=True)
    researcher.is_staff = True
    researcher.save()
    researcher.user_permissions.add(*Permission.objects.filter(codename__in=["view_datasetexportdownload", "change_datasetexportdownload", "delete_datasetexportdownload"]))
    admin = _logged_in(researcher)
    listing = admin.get("/admin/research/datasetexportdownload/")
    assert listing.status_code == 200
    shown = list(listing.context["cl"].result_list)
    assert [d.export.experiment for d in shown] == [experiment]
    row = shown[0]
    assert admin.post(f"/admin/research/datasetexportdownload/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert DatasetExportDownload.objects.count() == 2

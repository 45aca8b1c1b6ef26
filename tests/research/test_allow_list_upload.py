"""The allow-list from an uploaded file, through the experiment's admin page."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from research.services import external_ids_from_text
from tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def test_ids_come_from_a_panel_csv_column_or_from_a_plain_list() -> None:
    prolific = "Submission id,Participant id,Status\nS1,PID-A,APPROVED\nS2,PID-B,RETURNED\nS3,,AWAITING\n"
    assert external_ids_from_text(prolific) == ["PID-A", "PID-B"]
    assert external_ids_from_text("PROLIFIC_PID\nX1\nX2\n") == ["X1", "X2"]
    assert external_ids_from_text("X1\nX2, X3;X4\n\n") == ["X1", "X2", "X3", "X4"]
    assert external_ids_from_text("") == []


def _change_form_data(client, experiment, researcher) -> tuple[str, dict]:
    url = f"/admin/deliberation/experiment/{experiment.pk}/change/"
    form = client.get(url).context["adminform"].form
    data = {key: value for key, value in form.initial.items() if value is not None and key != "questions"}
    data.update({
        "owner": researcher.pk, "status": "active", "questions": list(experiment.questions.values_list("pk", flat=True)),
        "require_allow_list": "on", "arms-TOTAL_FORMS": "1", "arms-INITIAL_FORMS": "1",
        "allowed_external_ids-TOTAL_FORMS": "0", "allowed_external_ids-INITIAL_FORMS": "0",
        "collaborations-TOTAL_FORMS": "0", "collaborations-INITIAL_FORMS": "0",
    })
    arm = experiment.arms.get()
    data.update({f"arms-0-{f}": getattr(arm, f) for f in ("name", "welfare_method", "welfare_alpha", "welfare_tie_break", "n_candidates", "k_shown", "weight")})
    data.update({"arms-0-id": arm.pk, "arms-0-experiment": experiment.pk})
    return url, {k: v for k, v in data.items() if v is not None}


def test_the_admin_adds_the_ids_of_an_uploaded_file(client, researcher) -> None:
    researcher.is_staff = researcher.is_superuser = True
    researcher.save()
    client.force_login(researcher)
    experiment = ExperimentFactory(owner=researcher, slug="upload")
    url, data = _change_form_data(client, experiment, researcher)
    assert 'enctype="multipart/form-data"' in client.get(url).content.decode()
    upload = SimpleUploadedFile("prolific.csv", "\ufeffSubmission id,Participant id\nS1,PID-A\nS2,PID-B\n".encode(), content_type="text/csv")
    response = client.post(url, {**data, "add_allowed_external_ids": "PID-C", "allow_list_file": upload})
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    assert sorted(experiment.allowed_external_ids.values_list("external_id", flat=True)) == ["PID-A", "PID-B", "PID-C"]

    # A file that is not text is refused with a reason, and nothing is added.
    bad = SimpleUploadedFile("ids.xlsx", b"\xff\xfe\x00PK\x03\x04 binary", content_type="application/octet-stream")
    response = client.post(url, {**data, "allow_list_file": bad})
    assert response.status_code == 200 and "not UTF-8 text" in response.content.decode()
    assert experiment.allowed_external_ids.count() == 3

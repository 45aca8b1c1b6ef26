"""A participant dropped at a deadline is told so and gets no completion code; the export says who completed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from deliberation import services
from deliberation.models import Presentation, Round
from deliberation.tasks import mediate_round
from research.models import DatasetExport
from tests.conftest import OPINIONS
from tests.research.study import read_export_zip

pytestmark = pytest.mark.django_db


def _finish(persona) -> None:
    shown = list(Presentation.objects.filter(participant=persona.participant).order_by("position").values_list("candidate_id", flat=True))
    for candidate_id in shown:
        services.rating_submit(participant=persona.participant, candidate_id=candidate_id, agreement=5, quality=5)
    services.ranking_submit(participant=persona.participant, positions={cid: i + 1 for i, cid in enumerate(shown)})


def test_a_silent_member_sees_they_were_dropped_and_gets_no_code(group, tmp_path: Path) -> None:
    writers, silent = group[:2], group[2]
    for persona, text in zip(writers, OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.current(room_id=silent.participant.room_id)
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.OPINIONS) == "mediating"
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    for persona in writers:
        _finish(persona)
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.DONE

    page = silent.client.get(reverse("participant", args=[silent.participant.code])).content.decode()
    assert "You were dropped from this discussion" in page
    assert "You have finished" not in page and "completion-code" not in page
    assert silent.participant.completion_code() not in page
    finished = writers[0].client.get(reverse("participant", args=[writers[0].participant.code])).content.decode()
    assert "completion-code" in finished and writers[0].participant.completion_code() in finished

    experiment = silent.participant.room.experiment
    call_command("export_dataset", "--experiment", experiment.slug, "--format", "csv", "--out", str(tmp_path), "--as-user", experiment.owner.username)
    tables, _, readme = read_export_zip(Path(DatasetExport.objects.get().path), "csv")
    assert "completion_status" in tables["participants:header"]
    status = {row["label"]: row["completion_status"] for row in tables["participants"]}
    assert status == {writers[0].participant.label: "completed", writers[1].participant.label: "completed", silent.participant.label: "dropped"}
    assert "| `completion_status` |" in readme

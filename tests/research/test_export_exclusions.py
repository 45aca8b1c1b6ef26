"""The export's exclusions table: which analysis rules remove each participant, and which rows are simulated."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from deliberation import services
from deliberation.models import AttentionCheck, Participant
from research import analytics
from research.models import DatasetExport
from tests.research.study import build_study, read_export_zip

pytestmark = pytest.mark.django_db


def test_the_export_records_each_rule_and_the_bots(researcher, tmp_path: Path) -> None:
    study = build_study(owner=researcher, slug="excl")
    dropped, inattentive, bot = study.members[0], study.members[4], study.members[8]
    Participant.objects.filter(pk=dropped.pk).update(dropped_out_at=timezone.now(), finished_at=None, dropout_reason="rating deadline")
    AttentionCheck.objects.filter(participant=inattentive).update(passed=False)
    assert services.participant_persona_record(room_id=bot.room_id, external_id=bot.external_id, persona={"kind": "bot", "stance": 1})
    assert not services.participant_persona_record(room_id=bot.room_id, external_id="nobody", persona={"kind": "bot"})

    call_command("export_dataset", "--experiment", "excl", "--format", "csv", "--out", str(tmp_path), "--as-user", researcher.username, stdout=StringIO())
    tables, package, readme = read_export_zip(Path(DatasetExport.objects.get().path), "csv")
    rows = tables["exclusions"]
    assert len(rows) == len(study.members)
    pseudonyms = {row["participant_id"]: row for row in tables["participants"]}
    assert set(pseudonyms) == {row["participant_id"] for row in rows}
    by_group = {}
    for row in rows:
        by_group.setdefault(row["group_id"], []).append(row)
    flagged = {row["excluded_by"] for row in rows if row["excluded_by"]}
    # The dropout's whole group is incomplete (a member did not finish); the inattentive member only fails attention.
    assert "dropouts+incomplete_groups" in flagged and "failed_attention" in flagged
    assert sum(row["dropouts"] == "true" for row in rows) == 1 and sum(row["failed_attention"] == "true" for row in rows) == 1
    assert sum(row["incomplete_groups"] == "true" for row in rows) == 3
    simulated = [row for row in rows if row["simulated"] == "true"]
    assert len(simulated) == 1 and '"stance":1' in simulated[0]["persona"]
    assert all(row["persona"] == "" for row in rows if row["simulated"] == "false")
    assert "### exclusions" in readme

    # The analytics remove the same people: the dropout's group is gone under incomplete_groups.
    report = analytics.experiment_report(study.experiment, ("dropouts", "failed_attention", "incomplete_groups"))
    counts = {count.rule: count.participants for count in report.analysis.exclusions}
    assert counts == {"dropouts": 1, "failed_attention": 1, "incomplete_groups": 3, "dropouts+failed_attention+incomplete_groups": 4}
    assert report.without_exclusions is not None
    ratings_with = sum(arm.ratings for arm in report.analysis.arms)
    ratings_without = sum(arm.ratings for arm in report.without_exclusions.arms)
    assert ratings_with == ratings_without - 4 * 2  # four members out, two statements each

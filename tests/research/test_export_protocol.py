"""The Habermas Machine protocol's export tables: critiques, positions, final preferences, human statements, rounds."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from deliberation.models import Candidate
from research.exports import ExportContext
from research.models import DatasetExport
from tests.research.protocol_study import build_protocol_study
from tests.research.study import read_export_zip

pytestmark = pytest.mark.django_db


def test_the_protocol_tables_carry_their_provenance(tmp_path: Path) -> None:
    study = build_protocol_study("export-protocol")
    author = study.members[0]
    human = Candidate.objects.create(
        round=study.critique, index=9, text="We, the mediator, wrote this.", backend="human", model_id="human", seed=0, prompt="",
        author=author, shown=False, latency_ms=1234.0,
    )
    call_command("export_dataset", "--experiment", study.experiment.slug, "--format", "csv", "--out", str(tmp_path), "--as-user", study.experiment.owner.username, stdout=StringIO())
    export = DatasetExport.objects.order_by("-id").first()
    assert export is not None
    tables, _, readme = read_export_zip(Path(export.path), "csv")
    ctx = ExportContext(experiment=study.experiment, include_external_ids=False)
    a, b = (ctx.pseudonym(m.pk) for m in study.members)

    assert [row["text"] for row in tables["opinions"]] == ["opinion of Participant A", "opinion of Participant B"]
    critiques = tables["critiques"]
    assert [(r["participant_id"], r["text"]) for r in critiques] == [(a, "critique by Participant A"), (b, "critique by Participant B")]
    assert {r["previous_winner_candidate_id"] for r in critiques} == {str(study.first_statements[1].pk)}
    assert {r["round_index"] for r in critiques} == {"1"}

    rounds = {r["round_index"]: r for r in tables["protocol_rounds"]}
    assert rounds["0"]["kind"] == "opinion" and rounds["0"]["winner_candidate_id"] == str(study.first_statements[1].pk)
    assert rounds["1"]["kind"] == "critique" and rounds["1"]["previous_winner_candidate_id"] == str(study.first_statements[1].pk)
    assert rounds["1"]["winner_candidate_id"] == str(study.revised[0].pk)

    positions = {(r["participant_id"], r["stage"]): (r["position"], r["round_id"]) for r in tables["positions"]}
    assert positions[(a, "before")] == ("2", str(study.first.pk)) and positions[(a, "after")] == ("3", str(study.critique.pk))

    preferences = {r["participant_id"]: r for r in tables["final_preferences"]}
    assert preferences[a]["prefers_revision"] == "true" and preferences[b]["prefers_revision"] == "false"
    assert preferences[b]["preferred_candidate_id"] == str(study.first_statements[1].pk)

    (statement,) = tables["human_statements"]
    assert statement["candidate_id"] == str(human.pk) and statement["author_id"] == a
    assert statement["previous_winner_candidate_id"] == str(study.first_statements[1].pk)
    assert "### critiques" in readme and "| `previous_winner_candidate_id` |" in readme

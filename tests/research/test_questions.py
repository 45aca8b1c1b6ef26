"""import_questions: the Habermas Machine bank (JSON), its CSV form, idempotence and line-numbered errors.

The bank is DeepMind's (google-deepmind/habermas_machine), CC-BY-4.0; it is read from ../shared/data
and never copied into the project.
"""

from __future__ import annotations

import csv
import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from deliberation.models import Question
from research.questions import HM_SOURCE, import_questions
from tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db

HM_BANK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hm_questions.json"
FIELDS = ["id", "question", "affirming_statement", "negating_statement", "topic", "split"]


def _run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("import_questions", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bank() -> list[dict]:
    assert HM_BANK.is_file(), f"the Habermas Machine question bank should be at {HM_BANK}"
    return json.loads(HM_BANK.read_text())


def test_the_whole_bank_imports_once_and_a_second_run_changes_nothing(bank) -> None:
    out, err = _run(str(HM_BANK))
    assert "created 5645, updated 0, skipped 0" in out and "0 errors" in out and err == ""
    assert Question.objects.count() == 5645
    assert dict((s, Question.objects.filter(split=s).count()) for s in ("train", "iid_test", "ood_test")) == {
        "train": 4500, "iid_test": 565, "ood_test": 580,
    }
    first = bank[0]
    question = Question.objects.get(external_id=first["id"])
    assert (question.text, question.affirming_statement, question.negating_statement) == (
        first["question"], first["affirming_statement"], first["negating_statement"],
    )
    assert question.topic == str(first["topic"]) and question.split == first["split"]
    assert "CC-BY-4.0" in question.source and "DeepMind" in question.source
    out, _ = _run(str(HM_BANK))
    assert "created 0, updated 0, skipped 5645" in out
    assert Question.objects.count() == 5645


def test_split_and_topic_filters_import_only_matching_questions(bank) -> None:
    report = import_questions(HM_BANK, split="ood_test", topic="3")
    expected = [row for row in bank if row["split"] == "ood_test" and str(row["topic"]) == "3"]
    assert expected, "the bank has ood_test questions of topic 3"
    assert report.created == len(expected) == Question.objects.count()
    assert report.filtered_out == len(bank) - len(expected)
    assert set(Question.objects.values_list("split", "topic").distinct()) == {("ood_test", "3")}


def test_the_csv_form_reports_bad_rows_by_line_and_imports_the_good_ones(tmp_path: Path, bank) -> None:
    path = tmp_path / "questions.csv"
    good = [{k: row[k] for k in FIELDS} for row in bank[:3]]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()  # line 1
        writer.writerow(good[0])  # line 2
        writer.writerow({**good[1], "question": ""})  # line 3: empty question
        writer.writerow({**good[2], "question": "A question\nthat spans two lines?"})  # lines 4-5
        writer.writerow({**good[0], "question": "Same id again?"})  # line 6: duplicate id
        writer.writerow({**good[1], "id": "x" * 65})  # line 7: id too long
    out, err = _run(str(path), "--source", "test bank")
    assert "created 2, updated 0, skipped 0" in out and "3 errors" in out
    assert "line 3: question is empty" in err
    assert f"line 6: duplicate id {good[0]['id']} (first on line 2)" in err
    assert "line 7: id is longer than 64 characters" in err
    assert Question.objects.get(external_id=good[2]["id"]).text == "A question\nthat spans two lines?"
    with pytest.raises(CommandError, match="3 bad rows"):
        _run(str(path), "--strict")


def test_a_changed_row_is_updated_in_place(tmp_path: Path, bank) -> None:
    path = tmp_path / "bank.json"
    rows = [dict(row) for row in bank[:2]]
    path.write_text(json.dumps(rows))
    import_questions(path)
    rows[1]["question"] = "Reworded?"
    path.write_text(json.dumps(rows))
    report = import_questions(path)
    assert (report.created, report.updated, report.skipped) == (0, 1, 1)
    assert Question.objects.get(external_id=rows[1]["id"]).text == "Reworded?"


def test_json_errors_carry_the_line_of_the_bad_element(tmp_path: Path) -> None:
    path = tmp_path / "bank.json"
    path.write_text(
        '[\n'
        '  {"id": "a", "question": "Q1?", "affirming_statement": "", "negating_statement": "", "topic": 1, "split": "train"},\n'
        '  {"id": "b", "question": "Q2?", "topic": 1, "split": "train"},\n'
        '  "not an object",\n'
        '  {"id": true, "question": "Q3?", "affirming_statement": "", "negating_statement": "", "topic": 1, "split": "train"}\n'
        ']\n'
    )
    report = import_questions(path)
    assert report.created == 1
    assert [str(e) for e in report.errors] == [
        "line 3: missing affirming_statement, negating_statement",
        "line 4: expected an object with id, question, affirming_statement, negating_statement, topic, split, got str",
        "line 5: id must be text or a whole number, got bool",
    ]


def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"id": "a",\n')
    with pytest.raises(CommandError, match="line 3: invalid JSON"):
        _run(str(broken))
    with pytest.raises(CommandError, match="no such file"):
        _run(str(tmp_path / "missing.json"))
    wrong = tmp_path / "questions.txt"
    wrong.write_text("x")
    with pytest.raises(CommandError, match="unknown file type"):
        _run(str(wrong))


def test_imported_questions_can_be_attached_to_an_experiment(tmp_path: Path, bank) -> None:
    experiment = ExperimentFactory(slug="ood-study")
    experiment.questions.clear()
    out, _ = _run(str(HM_BANK), "--split", "iid_test", "--experiment", "ood-study", "--as-user", experiment.owner.username)
    assert "Attached 565 questions" in out
    assert experiment.questions.count() == 565
    assert set(experiment.questions.values_list("split", flat=True)) == {"iid_test"}
    assert HM_SOURCE in experiment.questions.first().source
    with pytest.raises(CommandError, match="No experiment"):
        _run(str(HM_BANK), "--experiment", "nope", "--as-user", experiment.owner.username)

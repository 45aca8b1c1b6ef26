"""Importing a question bank: the Habermas Machine JSON, its CSV form, or JSON lines.

Rows are matched to questions by their bank id (`Question.external_id`), so importing the same file
twice changes nothing. A bad row is reported with its line number and skipped; the good rows are
still imported.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from deliberation.models import Experiment, Question

REQUIRED_FIELDS = ("id", "question", "affirming_statement", "negating_statement", "topic", "split")
HM_SOURCE = "Habermas Machine question bank (google-deepmind/habermas_machine), © 2024 DeepMind Technologies Limited, CC-BY-4.0"
BATCH_SIZE = 500

# Question fields set from a row, by the row's field name.
_FIELD_MAP = {
    "question": "text",
    "affirming_statement": "affirming_statement",
    "negating_statement": "negating_statement",
    "topic": "topic",
    "split": "split",
}
_MAX_LENGTH = {"id": 64, "topic": 200, "split": 32}


class QuestionFileError(Exception):
    """The file as a whole cannot be read (not one bad row: those are reported per line)."""


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    skipped: int = 0  # already present and identical
    filtered_out: int = 0  # valid, but not of the requested split or topic
    errors: list[RowError] = field(default_factory=list)
    question_ids: list[int] = field(default_factory=list)  # database ids of the rows imported or matched

    def summary(self) -> str:
        return (
            f"created {self.created}, updated {self.updated}, skipped {self.skipped} (unchanged), "
            f"{self.filtered_out} not matching the filters, {len(self.errors)} errors"
        )


# --- Reading -------------------------------------------------------------------------------------


def _json_rows(text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) for each element of a top-level JSON array, decoded one element at a time,
    so each element's line is known and one malformed element does not hide the others' lines."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if position >= len(text) or text[position] != "[":
        raise QuestionFileError("expected a JSON array of questions ([ {...}, {...} ])")
    position += 1
    line = 1 + text.count("\n", 0, position)
    counted_to = position
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            return
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # Past a syntax error the array's structure is unknown: report it and stop.
            raise QuestionFileError(f"line {error.lineno}: invalid JSON ({error.msg})") from None
        yield line, value
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position < len(text) and text[position] == "]":
            return
        else:
            found_line = 1 + text.count("\n", 0, position)
            raise QuestionFileError(f"line {found_line}: expected ',' or ']' after an element")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _jsonl_rows(text: str) -> Iterator[tuple[int, Any]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            yield line_number, RowError(line_number, f"invalid JSON ({error.msg})")


def _csv_rows(text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    missing = [name for name in REQUIRED_FIELDS if name not in (reader.fieldnames or [])]
    if missing:
        raise QuestionFileError(f"line 1: the CSV header lacks {', '.join(missing)} (needs {', '.join(REQUIRED_FIELDS)})")
    start = reader.line_num + 1
    for row in reader:
        if None in row:  # more cells than header columns
            yield start, RowError(start, f"{len(row) - 1 + len(row[None])} cells for {len(reader.fieldnames or [])} columns")
        else:
            yield start, row
        start = reader.line_num + 1


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QuestionFileError(f"no such file: {path}") from None
    except UnicodeDecodeError as error:
        raise QuestionFileError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(text)
    if suffix == ".jsonl":
        return _jsonl_rows(text)
    if suffix == ".json":
        return _json_rows(text)
    raise QuestionFileError(f"unknown file type {suffix or '(none)'}: use .json, .jsonl or .csv")


# --- Validating --------------------------------------------------------------------------------------


def _clean(line: int, row: Any) -> dict[str, str] | RowError:
    if isinstance(row, RowError):
        return row
    if not isinstance(row, dict):
        return RowError(line, f"expected an object with {', '.join(REQUIRED_FIELDS)}, got {type(row).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in row or row[name] is None]
    if missing:
        return RowError(line, f"missing {', '.join(missing)}")
    cleaned: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return RowError(line, f"{name} must be text or a whole number, got {type(value).__name__}")
        text = str(value).strip()
        if name in ("id", "question") and not text:
            return RowError(line, f"{name} is empty")
        if name in _MAX_LENGTH and len(text) > _MAX_LENGTH[name]:
            return RowError(line, f"{name} is longer than {_MAX_LENGTH[name]} characters")
        cleaned[name] = text
    return cleaned


# --- Importing ---------------------------------------------------------------------------------------


def import_questions(
    path: Path | str,
    *,
    split: str | None = None,
    topic: str | None = None,
    source: str = HM_SOURCE,
    experiment: Experiment | None = None,
) -> ImportReport:
    """Create or update the questions in `path`, keyed by bank id; optionally attach them to `experiment`."""
    path = Path(path)
    report = ImportReport()
    valid: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for line, row in read_rows(path):
        cleaned = _clean(line, row)
        if isinstance(cleaned, RowError):
            report.errors.append(cleaned)
            continue
        bank_id = cleaned["id"]
        if bank_id in first_line:
            report.errors.append(RowError(line, f"duplicate id {bank_id} (first on line {first_line[bank_id]})"))
            continue
        first_line[bank_id] = line
        if (split and cleaned["split"] != split) or (topic is not None and topic != "" and cleaned["topic"] != topic):
            report.filtered_out += 1
            continue
        valid[bank_id] = cleaned
    with transaction.atomic():
        existing = {q.external_id: q for q in Question.objects.filter(external_id__in=list(valid))}
        to_create: list[Question] = []
        to_update: list[Question] = []
        now = timezone.now()  # bulk_update does not apply auto_now
        for bank_id, row in valid.items():
            values = {model_field: row[row_field] for row_field, model_field in _FIELD_MAP.items()}
            values["source"] = source
            question = existing.get(bank_id)
            if question is None:
                to_create.append(Question(external_id=bank_id, **values))
            elif any(getattr(question, name) != value for name, value in values.items()):
                for name, value in values.items():
                    setattr(question, name, value)
                question.updated_at = now
                to_update.append(question)
            else:
                report.skipped += 1
        Question.objects.bulk_create(to_create, batch_size=BATCH_SIZE)
        Question.objects.bulk_update(to_update, [*_FIELD_MAP.values(), "source", "updated_at"], batch_size=BATCH_SIZE)
        report.created, report.updated = len(to_create), len(to_update)
        report.question_ids = list(Question.objects.filter(external_id__in=list(valid)).values_list("id", flat=True))
        if experiment is not None:
            experiment.questions.add(*report.question_ids)
    return report

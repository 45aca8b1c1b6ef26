"""Researchers' writes around the rooms: the allow-list, pausing a study, and dataset exports.

Same rules as deliberation.services: keyword-only, inside transaction.atomic, tasks queued by name
after commit.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.db import transaction
from django.utils import timezone

from deliberation import dispatch
from deliberation.dispatch import TaskName
from deliberation.inputs import clean_text
from deliberation.models import AllowedExternalId, Experiment
from deliberation.services import InvalidInput, ServiceError

from .models import DatasetExport, DatasetExportDownload


def allow_list_add(*, experiment: Experiment, external_ids: Iterable[str]) -> int:
    """Add external ids (one per item; blanks ignored) to the experiment's allow-list; returns how many were new."""
    wanted = {clean_text(value).strip()[:200] for value in external_ids if value and clean_text(value).strip()}
    with transaction.atomic():
        known = set(AllowedExternalId.objects.filter(experiment=experiment, external_id__in=wanted).values_list("external_id", flat=True))
        AllowedExternalId.objects.bulk_create(
            [AllowedExternalId(experiment=experiment, external_id=value) for value in sorted(wanted - known)], ignore_conflicts=True
        )
    return len(wanted - known)


# Column names that hold the ids in a panel's CSV (compared lower-cased, spaces as underscores): Prolific's
# "Participant id", PROLIFIC_PID, or a plain list's header.
EXTERNAL_ID_COLUMNS = ("external_id", "participant_id", "prolific_pid", "pid", "id")


def external_ids_from_text(text: str) -> list[str]:
    """The external ids in pasted text or an uploaded file: a CSV whose header names an id column
    (EXTERNAL_ID_COLUMNS) gives that column; anything else is ids separated by line breaks, commas,
    semicolons or spaces."""
    lines = text.splitlines()
    if lines:
        header = [name.strip().lower().replace(" ", "_") for name in next(csv.reader(lines[:1]), [])]
        for name in EXTERNAL_ID_COLUMNS:
            if name in header:
                column = header.index(name)
                return [row[column].strip() for row in csv.reader(lines[1:]) if len(row) > column and row[column].strip()]
    return [token for token in re.split(r"[\s,;]+", text) if token]


def experiment_pause(*, experiment: Experiment, paused: bool) -> Experiment:
    """Pause or resume a study. A closed study stays closed: neither can reopen it."""
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        if experiment.status == Experiment.Status.CLOSED:
            raise InvalidInput("This study is closed: it cannot be paused or resumed.")
        experiment.status = Experiment.Status.PAUSED if paused else Experiment.Status.ACTIVE
        experiment.save(update_fields=["status"])
    return experiment

def dataset_export_request(
    *,
    experiment: Experiment,
    requested_by: User | AnonymousUser | None,
    via: str,
    format: str,
    include_external_ids: bool = False,
    out_dir: str | Path | None = None,
    enqueue_task: bool = True,
) -> DatasetExport:
    """Write the audit-log row of an export and (after commit) enqueue the task that writes it."""
    if format not in DatasetExport.Format.values:
        raise InvalidInput(f"Unknown export format {format!r}: choose one of {', '.join(DatasetExport.Format.values)}.")
    directory = Path(out_dir) if out_dir else Path(settings.CONCORD_EXPORT_DIR)
    with transaction.atomic():
        export = DatasetExport.objects.create(
            experiment=experiment,
            requested_by=requested_by if isinstance(requested_by, User) else None,
            requested_via=via,
            format=format,
            include_external_ids=include_external_ids,
            out_dir=str(directory.resolve()),
        )
        if enqueue_task:
            export_id = export.pk

            def enqueue_or_fail() -> None:
                # Nothing sweeps for lost exports: one that could not be queued says so on the exports page.
                if not dispatch.enqueue(TaskName.EXPORT_DATASET, args=[export_id]):
                    dataset_export_fail(export_id=export_id, error="Could not be queued: the task broker was unavailable. Please request it again.")

            transaction.on_commit(enqueue_or_fail)
    return export


def dataset_export_claim(*, export_id: int) -> DatasetExport | None:
    """Start (or, after a lost worker, restart) an export; None when it is already done."""
    with transaction.atomic():
        export = DatasetExport.objects.select_for_update(of=("self",)).select_related("experiment").get(pk=export_id)
        if export.status == DatasetExport.Status.DONE:
            return None
        export.status = DatasetExport.Status.RUNNING
        export.started_at = timezone.now()
        export.error = ""
        export.save(update_fields=["status", "started_at", "error"])
    return export


def dataset_export_progress(*, export_id: int, done: int, total: int) -> None:
    DatasetExport.objects.filter(pk=export_id, status=DatasetExport.Status.RUNNING).update(progress_done=done, progress_total=total)


def dataset_export_finish(*, export_id: int, path: str, sha256: str, row_counts: dict[str, int]) -> None:
    with transaction.atomic():
        DatasetExport.objects.filter(pk=export_id).update(
            status=DatasetExport.Status.DONE, path=path, sha256=sha256, row_counts=row_counts, finished_at=timezone.now()
        )


def dataset_export_fail(*, export_id: int, error: str) -> None:
    with transaction.atomic():
        DatasetExport.objects.filter(pk=export_id).update(status=DatasetExport.Status.FAILED, error=error[:4000], finished_at=timezone.now())


__all__ = [
    "InvalidInput",
    "ServiceError",
    "allow_list_add",
    "dataset_export_claim",
    "dataset_export_fail",
    "dataset_export_finish",
    "dataset_export_progress",
    "dataset_export_request",
    "experiment_pause",
]


def dataset_export_download_record(*, export: DatasetExport, downloaded_by: User | AnonymousUser, client_address: str | None) -> DatasetExportDownload:
    """Audit one download of an export's file (called before the file is sent)."""
    with transaction.atomic():
        return DatasetExportDownload.objects.create(
            export=export,
            downloaded_by=downloaded_by if downloaded_by.is_authenticated else None,
            include_external_ids=export.include_external_ids,
            client_address=client_address,
        )

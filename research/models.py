"""Research records: the audit log of dataset exports.

The rooms' own data (experiments, arms, rooms, rounds, ratings) lives in deliberation.models;
research reads it, and deliberation never imports research.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from deliberation.models import Experiment


class DatasetExport(models.Model):
    """The audit log of dataset exports: who exported what, when, with which flags, and how it went."""

    class Format(models.TextChoices):
        CSV = "csv", "CSV"
        PARQUET = "parquet", "Parquet"
        JSONL = "jsonl", "JSON lines"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="exports")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    requested_via = models.CharField(max_length=20)  # "command", "admin" or "web"
    format = models.CharField(max_length=16, choices=Format.choices)
    include_external_ids = models.BooleanField(default=False)
    out_dir = models.CharField(max_length=500)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    row_counts = models.JSONField(default=dict, blank=True)
    path = models.CharField(max_length=700, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The table keeps its name from when the model lived in deliberation (migration research 0001).
        db_table = "deliberation_datasetexport"

    def __str__(self) -> str:
        return f"Export {self.pk} of {self.experiment.slug} ({self.format}, {self.status})"


class DatasetExportDownload(models.Model):
    """The audit log of export downloads: every time an export's file was handed to someone, who, when,
    from which address, and whether it held external ids. Written by the download view before the file
    is sent; nobody can change or delete it (the admin is read-only)."""

    export = models.ForeignKey(DatasetExport, on_delete=models.CASCADE, related_name="downloads")
    downloaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    # The export's flag, copied: the log says what left the building even if the export row is read alone.
    include_external_ids = models.BooleanField()
    client_address = models.GenericIPAddressField(null=True, blank=True)
    downloaded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-downloaded_at", "-id"]

    def __str__(self) -> str:
        return f"Download of export {self.export_id} by {self.downloaded_by or 'unknown'}"

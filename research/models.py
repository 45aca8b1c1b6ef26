"""Research records: the audit log of dataset exports, and the training runs started from the researcher pages.

The rooms' own data (experiments, arms, rooms, rounds, ratings) lives in deliberation.models;
research reads it, and deliberation never imports research.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from deliberation.models import Experiment, GeneratorVersion, RewardModelVersion
from modeling.training.methods import training_method_choices


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
class TrainingRun(models.Model):
    """A training job a researcher started from the researcher pages (research.training): which data,
    which method and parent, how far it got, its log, and the version it registered (only on success)."""

    class Kind(models.TextChoices):
        GENERATOR = "generator", "Generator"
        REWARD_MODEL = "reward_model", "Reward model (stance head)"
        # Not training: evaluate_generator on the dev groups for one version (research.generator_evaluation).
        EVALUATION = "evaluation", "Evaluation of a generator version"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    # The generator's training method (modeling.training.methods); blank for the reward model.
    method = models.CharField(max_length=20, blank=True, choices=training_method_choices)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    experiments = models.ManyToManyField(Experiment, related_name="training_runs")
    parent = models.ForeignKey(GeneratorVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # The data filters and hyper-parameters asked for.
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    steps_done = models.PositiveIntegerField(default=0)
    steps_total = models.PositiveIntegerField(default=0)
    loss = models.FloatField(null=True, blank=True)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    dataset_path = models.CharField(max_length=700, blank=True)
    generator_version = models.ForeignKey(GeneratorVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="training_runs")
    reward_model_version = models.ForeignKey(RewardModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # An evaluation run: the version it evaluates, and evaluate_generator's report once done.
    evaluated_version = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.CASCADE, related_name="evaluation_runs"
    )
    report = models.JSONField(default=dict, blank=True)
    # The run a researcher retried to make this one (same data, method, base and options).
    retry_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    # The heartbeat: the worker's last sign of life (a step, or its beat while a model loads). A running run
    # without one for CONCORD_TRAINING_STALL_SECONDS lost its worker (research.training.training_runs_recover).
    progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Training run {self.pk} ({self.kind}, {self.status})"

    @property
    def percent(self) -> int:
        return int(100 * self.steps_done / self.steps_total) if self.steps_total else 0

    @property
    def finished(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.FAILED)

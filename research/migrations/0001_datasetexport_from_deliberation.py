"""DatasetExport moves from deliberation to research: the table stays, only Django's state moves.

deliberation 0005 removes the model from deliberation's state (after this migration adds it here),
and the content type is renamed, so admin log entries and permissions follow the model.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def move_content_type(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    if ContentType.objects.filter(app_label="research", model="datasetexport").exists():
        return
    ContentType.objects.filter(app_label="deliberation", model="datasetexport").update(app_label="research")


def move_content_type_back(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    ContentType.objects.filter(app_label="research", model="datasetexport").update(app_label="deliberation")


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("deliberation", "0004_arm_welfare_tie_break"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="DatasetExport",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("requested_via", models.CharField(max_length=20)),
                        ("format", models.CharField(choices=[("csv", "CSV"), ("parquet", "Parquet"), ("jsonl", "JSON lines")], max_length=16)),
                        ("include_external_ids", models.BooleanField(default=False)),
                        ("out_dir", models.CharField(max_length=500)),
                        (
                            "status",
                            models.CharField(
                                choices=[("pending", "Pending"), ("running", "Running"), ("done", "Done"), ("failed", "Failed")],
                                default="pending",
                                max_length=16,
                            ),
                        ),
                        ("progress_done", models.PositiveIntegerField(default=0)),
                        ("progress_total", models.PositiveIntegerField(default=0)),
                        ("row_counts", models.JSONField(blank=True, default=dict)),
                        ("path", models.CharField(blank=True, max_length=700)),
                        ("sha256", models.CharField(blank=True, max_length=64)),
                        ("error", models.TextField(blank=True)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("started_at", models.DateTimeField(blank=True, null=True)),
                        ("finished_at", models.DateTimeField(blank=True, null=True)),
                        (
                            "experiment",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE, related_name="exports", to="deliberation.experiment"
                            ),
                        ),
                        (
                            "requested_by",
                            models.ForeignKey(
                                blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to=settings.AUTH_USER_MODEL
                            ),
                        ),
                    ],
                    options={"ordering": ["-created_at", "-id"], "db_table": "deliberation_datasetexport"},
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(move_content_type, move_content_type_back),
    ]

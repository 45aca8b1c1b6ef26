"""DatasetExport now belongs to research (research 0001 took over its state); its table is unchanged."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("deliberation", "0004_arm_welfare_tie_break"),
        ("research", "0001_datasetexport_from_deliberation"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="DatasetExport")],
            database_operations=[],
        ),
    ]

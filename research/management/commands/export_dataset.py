"""python manage.py export_dataset --experiment X --format {csv,parquet,jsonl} --out DIR --as-user USERNAME"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Q

from accounts.commands import add_as_user_argument, experiment_for_command
from deliberation.models import Experiment
from research import services
from research.exports import PSEUDONYM_KEY_WARNING, pseudonyms_reversible, run_export
from research.models import DatasetExport


class Command(BaseCommand):
    help = "Export every table of an experiment, with its data dictionary, as one zip (recorded in the export audit log)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--experiment", required=True, metavar="SLUG")
        parser.add_argument("--format", required=True, choices=DatasetExport.Format.values)
        parser.add_argument("--out", required=True, type=Path, metavar="DIR")
        parser.add_argument("--include-external-ids", action="store_true", help="Include recruitment-panel ids (personal data).")
        parser.add_argument("--background", action="store_true", help="Queue the export for a Celery worker instead of running it here (needs REDIS_URL).")
        add_as_user_argument(parser)

    def handle(self, *args, experiment: str, format: str, out: Path, include_external_ids: bool, background: bool, as_user: str, **options) -> None:
        if background and not settings.USE_CELERY:
            # Without Celery a queued task runs in this process, which ends with the command.
            raise CommandError("--background needs Celery workers (set REDIS_URL); without it, run the export here.")
        # The same rule as the exports page: the owner, an editor or a superuser (external ids included).
        target, user = experiment_for_command(Experiment.objects.all(), lookup=Q(slug=experiment), described=f"with the slug {experiment!r}", username=as_user)
        if pseudonyms_reversible():
            self.stderr.write(self.style.WARNING("Warning: " + PSEUDONYM_KEY_WARNING))
        try:
            export = services.dataset_export_request(
                experiment=target, requested_by=user, via="command", format=format,
                include_external_ids=include_external_ids, out_dir=out, enqueue_task=background,
            )
        except services.ServiceError as error:
            raise CommandError(str(error)) from None
        if background:
            self.stdout.write(f"Queued export {export.pk}; it will be written to {export.out_dir}.")
            return
        last_table = [""]

        def progress(table: str, done: int, total: int) -> None:
            if table != last_table[0]:
                last_table[0] = table
                self.stdout.write(f"  {table}: {done}/{total} rows so far")

        result = run_export(export_id=export.pk, on_progress=progress)
        export.refresh_from_db()
        if result == "failed":
            raise CommandError(f"Export {export.pk} failed: {export.error}")
        self.stdout.write(f"Wrote {export.path} ({sum(export.row_counts.values())} rows in {len(export.row_counts)} tables; sha256 {export.sha256}).")

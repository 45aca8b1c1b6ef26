"""python manage.py import_questions PATH [--split S] [--topic T] [--experiment SLUG --as-user USERNAME]"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Q

from accounts.commands import add_as_user_argument, experiment_for_command
from deliberation.models import Experiment
from research.questions import HM_SOURCE, QuestionFileError, import_questions


class Command(BaseCommand):
    help = (
        "Import a question bank (the Habermas Machine JSON, its CSV form, or JSON lines), idempotently by question id. "
        "Bad rows are reported with their line numbers; the good rows are still imported."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", type=Path, help="A .json array, .jsonl or .csv file with id, question, affirming_statement, negating_statement, topic, split.")
        parser.add_argument("--split", help="Import only questions of this split (e.g. train, iid_test, ood_test).")
        parser.add_argument("--topic", help="Import only questions of this topic.")
        parser.add_argument("--source", default=HM_SOURCE, help="Where the questions come from (recorded on each, and credited in exports).")
        parser.add_argument("--experiment", metavar="SLUG", help="Also attach the imported questions to this experiment.")
        parser.add_argument("--strict", action="store_true", help="Exit with an error status if any row was bad.")
        # The bank is shared; attaching to an experiment changes that experiment, so it needs a researcher who may.
        add_as_user_argument(parser, required=False)

    def handle(self, *args, path: Path, split: str | None, topic: str | None, source: str, experiment: str | None, strict: bool, as_user: str | None, **options) -> None:
        target = None
        if experiment:
            target, _ = experiment_for_command(Experiment.objects.all(), lookup=Q(slug=experiment), described=f"with the slug {experiment!r}", username=as_user)
        try:
            report = import_questions(path, split=split, topic=topic, source=source, experiment=target)
        except QuestionFileError as error:
            raise CommandError(f"{path}: {error}") from None
        for row_error in report.errors:
            self.stderr.write(f"{path}: {row_error}")
        self.stdout.write(f"{path}: {report.summary()}.")
        if target is not None:
            self.stdout.write(f"Attached {len(report.question_ids)} questions to experiment {target.slug!r}.")
        if strict and report.errors:
            raise CommandError(f"{len(report.errors)} bad rows (see above).")
